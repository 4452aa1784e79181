"""Recipes: short scripts that compose the components into the commands of the CLI."""
