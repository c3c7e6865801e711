"""Training the feature drafter against a frozen target: features, objective, curriculum, trainer, CLI."""
