"""Methods: modules in, modules out. Each trains through far.train and returns a new model (the
modules passed in are left as they were, unless inplace=True where offered) with its run record
(`far_metadata`, stored by far.save; `far_run`, a far.train.RunReport).

    distill.py      far.distill: attention teacher -> FAR student (block-wise, two stages)
    prune.py        far.prune: Hoyer-square group pruning, global threshold, compaction
    supervised.py   far.train_classifier (a teacher from scratch), far.finetune (downstream)
    reuse.py        far.reuse: TReX-style attention reuse under a latency budget (the rival method)
"""
from far.methods.distill import distill, make_student
from far.methods.prune import prune
from far.methods.reuse import reuse, search_reuse
from far.methods.supervised import finetune, retarget_classes, train_classifier

__all__ = ["distill", "finetune", "make_student", "prune", "retarget_classes", "reuse", "search_reuse",
           "train_classifier"]
