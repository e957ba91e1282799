"""Infrastructure shared by every layer of `far`: files (fs), the machine (env), figures (plot)."""
