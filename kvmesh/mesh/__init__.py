"""What every process of the mesh shares: worker types, proto conversion, the gRPC server scaffolding,
registration and KV events, telemetry and worker metrics."""
