"""Mixed-precision planning: request records, target matching, resolution into a plan, and the
kernel and precision-change checks of a planned state (docs/rules.md; layer rules: docs/architecture.md)."""
