"""Generated from protos/ by scripts/gen_protos.py (`make protos`); do not edit."""
