"""Triton's views of a served model, shared by the gRPC and REST frontends: metadata, model
configuration, statistics and repository index as Triton's messages (REST sends them as
JSON), and Triton's conventions that are not ours (state names, the one-element-per-row
shape rule)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from hub.config import VersionPolicy
from hub.core.dataplane import DataPlane
from hub.core.models import ModelState, ServedModel
from hub.core.stats import Duration
from hub.datatypes import CONFIG_TYPE_NAMES
from hub.pipeline.report import report_parameters
from hub.protocol.generated import grpc_service_pb2 as pb
from hub.protocol.generated import model_config_pb2 as mc
from hub.spec import ModelSpec, TensorSpec

TensorMetadata = pb.ModelMetadataResponse.TensorMetadata

#: Our model states as Triton's RepositoryIndex names them.
STATE_NAMES = {
    ModelState.LOADING: "LOADING",
    ModelState.READY: "READY",
    ModelState.FAILED: "UNAVAILABLE",
    ModelState.UNLOADED: "UNAVAILABLE",
}


def one_per_row(spec: ModelSpec, tensor: TensorSpec) -> bool:
    """A batched input of one element per row ([-1], a sentence per row, say). On the wire it
    is what Triton calls dims [1] with reshape []: described as [-1, 1] (Triton's tools,
    perf_analyzer among them, need a per-row dim), and taken as [n] or [n, 1]."""
    return spec.batching.batching and tensor.shape == (-1,)


def model_inputs(spec: ModelSpec, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A request's inputs as the model takes them: one-element-per-row inputs sent as [n, 1]
    become [n]."""
    for tensor in spec.inputs:
        array = inputs.get(tensor.name)
        if array is not None and array.ndim == 2 and array.shape[1] == 1 and one_per_row(spec, tensor):
            inputs[tensor.name] = array.reshape(-1)
    return inputs


def platform(model: ServedModel) -> str:
    """The target's platform, loaded or not; a target no plugin registers has only its name."""
    return model.target.platform if model.target is not None else model.spec.target


def model_metadata(plane: DataPlane, model: ServedModel) -> pb.ModelMetadataResponse:
    spec = model.spec
    return pb.ModelMetadataResponse(
        name=spec.name,
        versions=[str(m.version) for m in plane.versions(spec.name)],
        platform=platform(model),
        inputs=[
            TensorMetadata(name=t.name, datatype=t.datatype, shape=(-1, 1) if one_per_row(spec, t) else t.shape)
            for t in spec.inputs
        ],
        outputs=[TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in spec.outputs],
    )


def _version_policy(policy: VersionPolicy) -> mc.ModelVersionPolicy:
    if policy.all:
        return mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All())
    if policy.specific:
        return mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=policy.specific))
    return mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=policy.latest or 1))


def _config_input(spec: ModelSpec, tensor: TensorSpec, skip: int) -> mc.ModelInput:
    if one_per_row(spec, tensor):
        return mc.ModelInput(
            name=tensor.name,
            data_type=CONFIG_TYPE_NAMES[tensor.datatype],
            dims=[1],
            reshape=mc.ModelTensorReshape(shape=[]),
        )
    return mc.ModelInput(name=tensor.name, data_type=CONFIG_TYPE_NAMES[tensor.datatype], dims=tensor.shape[skip:])


def model_config(plane: DataPlane, model: ServedModel) -> mc.ModelConfig:
    """The spec and policy as Triton's ModelConfig: dims without the batch dimension."""
    spec, policy = model.spec, model.spec.batching
    skip = 1 if policy.batching else 0
    config = mc.ModelConfig(
        name=spec.name,
        platform=platform(model),
        backend="modelhub",
        runtime=spec.target,
        max_batch_size=policy.max_batch_size,
        input=[_config_input(spec, t, skip) for t in spec.inputs],
        output=[
            mc.ModelOutput(
                name=t.name,
                data_type=CONFIG_TYPE_NAMES[t.datatype],
                dims=t.shape[skip:],
                label_filename="labels" if t.labels else "",
            )
            for t in spec.outputs
        ],
        instance_group=[
            mc.ModelInstanceGroup(
                name=f"{spec.name}_0",
                count=policy.instances,
                kind=mc.ModelInstanceGroup.KIND_GPU if model.device == "cuda" else mc.ModelInstanceGroup.KIND_CPU,
            )
        ],
        version_policy=_version_policy(plane.version_policy(model.name)),
        default_model_filename=model.target.artifact if model.target is not None else "",
    )
    if policy.batching:
        config.dynamic_batching.CopyFrom(
            mc.ModelDynamicBatching(
                preferred_batch_size=policy.preferred_batch_sizes,
                max_queue_delay_microseconds=round(policy.max_queue_delay * 1e6),
                default_queue_policy=mc.ModelQueuePolicy(
                    timeout_action=mc.ModelQueuePolicy.REJECT,
                    default_timeout_microseconds=round((policy.timeout or 0) * 1e6),
                    allow_timeout_override=True,
                    max_queue_size=policy.max_queue_size,
                ),
            )
        )
    for key, value in manifest_parameters(model).items():
        config.parameters[key].string_value = value
    return config


def manifest_parameters(model: ServedModel) -> dict[str, str]:
    """The model's state and its whole build report (hub/pipeline/report.py), flattened into
    ModelConfig parameters so that any Triton client can read them."""
    out = {"state": model.state.value}
    if model.reason:
        out["reason"] = model.reason
    manifest = model.manifest
    if manifest:
        out["built_at"] = str(manifest.get("built_at", ""))
        out["cache_key"] = str(manifest.get("cache_key", ""))
        out.update(report_parameters(manifest))
    return out


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def model_statistics(model: ServedModel) -> pb.ModelStatistics:
    s = model.stats
    return pb.ModelStatistics(
        name=model.name,
        version=str(model.version),
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(s.success),
            fail=_duration(s.fail),
            queue=_duration(s.queue),
            compute_input=_duration(s.compute_input),
            compute_infer=_duration(s.compute_infer),
            compute_output=_duration(s.compute_output),
            # No response cache here: zero, as Triton reports them without one (clients read them).
            cache_hit=pb.StatisticDuration(count=0, ns=0),
            cache_miss=pb.StatisticDuration(count=0, ns=0),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=_duration(b.compute_input),
                compute_infer=_duration(b.compute_infer),
                compute_output=_duration(b.compute_output),
            )
            for size, b in sorted(s.batches.items())
        ],
    )


def index_entry(model: ServedModel) -> pb.RepositoryIndexResponse.ModelIndex:
    return pb.RepositoryIndexResponse.ModelIndex(
        name=model.name, version=str(model.version), state=STATE_NAMES[model.state], reason=model.reason
    )


_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def as_json(message: Message) -> dict[str, Any]:
    """A message as Triton's HTTP API writes it: proto field names, and 64-bit integers as
    JSON numbers (protobuf's JSON mapping makes them strings, which Triton's clients and
    perf_analyzer do not read)."""
    # Zero counts and empty strings are printed, as Triton does: clients read
    # stats["inference_stats"]["fail"]["count"] without checking for it.
    data = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return _numbers(message, data)


def _numbers(message: Message, data: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(data)
    for fd in message.DESCRIPTOR.fields:
        if fd.name not in out:
            continue
        value = getattr(message, fd.name)
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            if fd.message_type.GetOptions().map_entry:
                entry_value = fd.message_type.fields_by_name["value"]
                if entry_value.type == FieldDescriptor.TYPE_MESSAGE:
                    out[fd.name] = {k: _numbers(value[k], v) for k, v in out[fd.name].items()}
                elif entry_value.type in _INT64:
                    out[fd.name] = {k: int(v) for k, v in out[fd.name].items()}
            elif fd.label == FieldDescriptor.LABEL_REPEATED:
                out[fd.name] = [_numbers(m, d) for m, d in zip(value, out[fd.name], strict=True)]
            else:
                out[fd.name] = _numbers(value, out[fd.name])
        elif fd.type in _INT64:
            out[fd.name] = (
                [int(v) for v in out[fd.name]] if fd.label == FieldDescriptor.LABEL_REPEATED else int(out[fd.name])
            )
    return out
