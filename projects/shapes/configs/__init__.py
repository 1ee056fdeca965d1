"""The `shapes` size of the family configs: `configs.<family>` at `tiny` with the Shapes fields."""
