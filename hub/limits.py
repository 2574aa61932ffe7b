"""The limits on what one request may cost, shared by every frontend (gRPC, REST), and the
time a REST client may take to send one.

A request is refused with INVALID_ARGUMENT (or RESOURCE_EXHAUSTED, for its size in bytes,
which the transport enforces) before anything proportional to what it *claims* is
allocated: a shape is only a claim until the buffer that backs it has been checked.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Per-request limits. The defaults serve every bundled model (ResNet-50 at batch 128 is
    19.3 M UINT8 elements, 19 MB) with room to spare; `modelhub serve --max-*` and the
    MODELHUB_MAX_* variables change them, and `--http-header-timeout`, `--http-body-timeout`
    and `--http-body-rate` (MODELHUB_HTTP_*) the REST timeouts.

    - `request_bytes`: the largest request message (gRPC's max receive length; the REST
      frontend's body limit). 64 MiB, as Triton's HTTP default.
    - `json_bytes` (REST): the largest JSON part of a request (the whole body, or the JSON
      header before binary data). Python's json makes up to ~60x its input in objects (empty
      or nested lists) and holds the GIL, and so the event loop, while it parses, as numpy does
      converting the lists: 4 MiB costs at most ~250 MB and 0.7-1.2 s (lists nested 32 deep,
      on the 2-core AMD EPYC box, 2026-12-07), 0.06-0.16 s for 4 MiB of floats as tritonclient writes them. 4 MiB takes
      a ResNet-50 image as JSON floats (~3 MiB); larger tensors belong in the binary
      extension, which tritonclient uses by default and which costs no parse.
    - `bytes_element`: the largest single BYTES element. 1 MiB fits an encoded image; for
      text-only deployments set it lower (tokenising 1 MiB of text for minilm costs about
      0.8 s of CPU and 170 MB).
    - `elements`: the most tensor elements in one request, over all its inputs, and the
      largest any one dimension, or the product of a shape's non-zero dimensions, may be.
    - `bytes_elements`: the most BYTES elements in one request. Each costs a Python object
      (about 40 bytes) and a step of a Python loop, so this is much lower than `elements`.
    - `typed_values` (gRPC): the most values of one input sent as typed integer contents
      (`contents.int_contents` and the like) that must be converted one by one: about 0.2 µs
      each, holding the event loop. FP32, FP64 and BOOL contents, and integers that all lie
      in 0..127, are read whole and do not count (hub/protocol/packed.py). tritonclient
      sends raw contents, which never count.
    - `request_entries` (gRPC): the most entries in one ModelInferRequest: inputs, requested
      outputs, parameters and raw_input_contents entries, and the fields within each input,
      requested output and input contents (each unpacked shape dim, say; a packed field is
      one). A real request has a handful. An empty entry is 2 bytes on the wire but a ~90-byte
      message once parsed, and a Python object in every loop over them: 31 M of them (60 MiB,
      under `request_bytes`; 61 KB gzip'd) cost 10-12 GB and stalled the server 13-56 s.
      Counted on the wire before the message is parsed (hub/protocol/wire.py), which also
      counts `contents.bytes_contents` entries against `bytes_elements`. The map entries of a
      trace or log settings, load or unload request count against it too (and a trace
      setting's values), for the same reason.
    - `stream_in_flight` (gRPC): the most requests of one ModelStreamInfer stream that are
      being computed or whose responses the client has not read yet. Past it the server stops
      reading the stream, and HTTP/2 flow control holds the client back.
    - `stream_bytes` (gRPC): the most bytes of answers one ModelStreamInfer stream may have
      computed or computing for a client that has not read them, counting each request at the
      size of the stream's largest answer so far (a stream reads its second request once its
      first answer is computed, so that size is known; an answer larger than this is computed
      alone). An answer larger than that size foretold, that would take the unread ones past
      this, is dropped and its request answered RESOURCE_EXHAUSTED. Each answer the client has
      not read is held whole: with `stream_in_flight` alone a stream of 30-byte requests for
      4 MiB answers that read nothing held 64 of them (270 MB); 128 such streams on
      one connection, 35 GB. 64 MiB, `request_bytes`: a stream holds about what one request may
      cost. At that bound 4 MiB answers compute 16 at a time per stream; answers of 1 MiB or
      less are bounded by `stream_in_flight` as before.
    - `unsent_bytes` (gRPC and REST): the most bytes of answers the server holds for clients
      that have not read them (computed and handed to the transport, not yet taken), counted at
      their tensors' size; one connection may hold a quarter of it. An answer that would take
      the server or its connection past its bound is dropped and its request answered
      RESOURCE_EXHAUSTED (429), unless nothing is held there (hub/core/unsent.py). Each held
      answer costs about 4x its size in gRPC's and Python's buffers (a JSON answer's text is
      2-3x its tensors): without a bound, 200 calls of 30 bytes for 4 MiB answers on one
      connection that granted no flow-control window took a server from 255 MB to 1.6 GB in
      6 s, and 100 REST connections that sent a request and read nothing, 440 MB. 512 MiB: at
      most about 2 GB held, 0.5 GB for one connection; clients that read take their answers
      as they come, and 128 MiB unread on one connection is 32 answers of 4 MiB that its client
      has not read yet. A client that gathers more large answers than it reads at once (a
      batch job of thousands of calls for images on a slow link) needs it raised, as does a
      proxy that carries many clients' calls on a few connections (the share is per
      connection the server sees). Answers
      under 4 KiB are not counted. With `--workers N` each frontend holds its share, the
      bound over N.
    - `grpc_streams` (gRPC): the most calls one HTTP/2 connection may have open at once
      (HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS); 0, the default, sets no bound, as Triton and
      grpc do. Each call holds its answer in the server (about 4x its size, grpc's buffers and
      Python's) until the client reads it: grpc closes a connection that reads nothing at all
      after 60 s (its SETTINGS unanswered), but one that answers pings and grants no
      flow-control window keeps what it asked for as long as it likes (100 unread 4 MiB answers
      held 1.2-1.6 GB). A bound caps that (at 128, about 2.1 GB), but grpc's Python client does
      not wait for a stream under it: past the bound its calls fail UNAVAILABLE ("RST_STREAM
      with error code 7", REFUSED_STREAM; 19 of 256 calls gathered at once on one tritonclient
      at 128), and gathering thousands of calls on one client is how a batch job is written.
      So it is an operator's choice, for servers whose clients are known.
    - `header_timeout` (REST, seconds): the longest a connection may go without a complete
      request line and headers: from its accept, and on a kept-alive connection from the end of
      the previous response (so it is also the keep-alive idle timeout). Past it the connection
      is closed (a request already being handled is not affected). 75 s: nginx's keep-alive
      timeout and above the 60 s idle timeout of AWS's load balancers and nginx's upstream
      keep-alive, so a proxy that keeps a connection idle for its own timeout is not cut off
      first; about what nginx (`client_header_timeout` 60 s) and Node.js (`headersTimeout` 60 s)
      give a request's headers. Behind a proxy that keeps connections idle longer (Google
      Cloud's load balancers: 600 s) raise it above the proxy's.
    - `body_timeout` and `body_rate` (REST): a request body must arrive within `body_timeout`
      seconds plus one second for every `body_rate` bytes received (Apache's mod_reqtimeout
      `body=...,MinRate=...`): a client that sends slower than `body_rate` bytes/s on average
      (1 byte/s, say) is answered 408 and its connection closed. 60 s (nginx's
      `client_body_timeout`) and 8 KiB/s (64 kbit/s, slower than a 2G link): a 64 MiB body at
      any rate above 8 KiB/s arrives in time, and a smaller one has 60 s more; holding a
      connection open costs a client 8 KiB/s, 2.6 Gbit/s for the 40,000 connections that
      would take every descriptor of two processes.
    """

    request_bytes: int = 64 << 20
    json_bytes: int = 4 << 20
    bytes_element: int = 1 << 20
    elements: int = 1 << 26
    bytes_elements: int = 1 << 16
    typed_values: int = 1 << 20
    request_entries: int = 1 << 14
    stream_in_flight: int = 64
    stream_bytes: int = 64 << 20
    unsent_bytes: int = 512 << 20
    grpc_streams: int = 0
    header_timeout: float = 75.0
    body_timeout: float = 60.0
    body_rate: int = 8 << 10

    def __post_init__(self) -> None:
        for name in (
            "request_bytes",
            "json_bytes",
            "bytes_element",
            "elements",
            "bytes_elements",
            "typed_values",
            "request_entries",
            "stream_in_flight",
            "stream_bytes",
            "unsent_bytes",
            "body_rate",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"limit {name} must be a positive integer, got {value!r}")
        streams = self.grpc_streams
        if not isinstance(streams, int) or streams < 0:
            raise ValueError(f"limit grpc_streams must be 0 (no bound) or a positive integer, got {streams!r}")
        for name in ("header_timeout", "body_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
                raise ValueError(f"limit {name} must be a positive number of seconds, got {value!r}")


#: The limits a server uses when it is given none.
DEFAULT_LIMITS = Limits()

#: The longest model name (characters) a plugin may register (hub/spec.py), and so the longest
#: a load or unload request may name: a longer one is refused (INVALID_ARGUMENT) before anything
#: looks for it, in one process as with --workers N, whose frontends forward the name.
MODEL_NAME_MAX = 128
#: The longest request id (characters) an inference request may carry. The id is echoed in the
#: response and written to the access log and traces; with --workers N a frontend forwards it
#: to the model process. Far above any id a client generates (a UUID is 36).
REQUEST_ID_MAX = 4096
