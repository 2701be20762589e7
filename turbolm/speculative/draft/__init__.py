"""Drafts trained on the target's own features (EAGLE / Jakiro style): ``data`` prepares the features."""
