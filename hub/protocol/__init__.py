"""The wire protocol: KServe V2 / Triton gRPC, translated to and from the core's domain types."""
