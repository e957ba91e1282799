"""Where a result's commit comes from (far.utils.env.environment, written by every benchmark and by `far imc-eval
--json` / `far analyze --json`): git in a checkout; on a copy without .git (the working tree a device machine
receives) the commit the sender passed as env FAR_GIT_COMMIT / FAR_GIT_DIRTY, said so in git_source."""
import pytest

import far.utils.env as env_mod


def test_checkout_commit_comes_from_git(monkeypatch):
    monkeypatch.setenv("FAR_GIT_COMMIT", "f" * 40)
    if not (env_mod.REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    env = env_mod.environment()
    assert env["git_source"] == "git" and len(env["git_commit"]) == 40 and env["git_commit"] != "f" * 40
    assert isinstance(env["git_dirty"], bool)


@pytest.mark.parametrize("dirty, want", [("1", True), ("true", True), ("0", False), ("", None), ("maybe", None)])
def test_copy_without_git_reads_the_env_vars(tmp_path, monkeypatch, dirty, want):
    monkeypatch.setattr(env_mod, "REPO_ROOT", tmp_path)  # no .git there: as on the device machine
    monkeypatch.setenv("FAR_GIT_COMMIT", " " + "a" * 40 + "\n")
    monkeypatch.setenv("FAR_GIT_DIRTY", dirty)
    env = env_mod.environment()
    assert (env["git_commit"], env["git_dirty"], env["git_source"]) == ("a" * 40, want, "env FAR_GIT_COMMIT")


def test_copy_without_git_or_env_says_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(env_mod, "REPO_ROOT", tmp_path)
    monkeypatch.delenv("FAR_GIT_COMMIT", raising=False)
    monkeypatch.setenv("FAR_GIT_DIRTY", "1")  # a dirty flag without a commit says nothing
    env = env_mod.environment()
    assert (env["git_commit"], env["git_dirty"], env["git_source"]) == (None, None, None)
