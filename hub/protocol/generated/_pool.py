"""Generated from protos/ by scripts/gen_protos.py; do not edit."""

from google.protobuf import descriptor_pool

# Private pool: see scripts/gen_protos.py for why not the default one.
POOL = descriptor_pool.DescriptorPool()
