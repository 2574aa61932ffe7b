"""The KServe V2 / Open Inference Protocol REST frontend, with Triton's binary tensor,
classification, statistics, configuration and repository extensions (aiohttp, on the
event loop that also runs grpc.aio)."""
