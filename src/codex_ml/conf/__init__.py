"""The Hydra config tree shipped with the package, and its typed schemas."""
