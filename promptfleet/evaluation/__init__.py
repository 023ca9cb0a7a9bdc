"""What follows a run: judge and rephrase files, verdicts, scorers, study tables."""
