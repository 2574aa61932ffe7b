"""Our protos against tritonclient's own descriptors: same package, service, methods, messages,
field numbers and types. And the generated code is not stale."""

from __future__ import annotations

import subprocess
import sys

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.grpc import service_pb2 as triton_service

from hub.protocol.generated import grpc_service_pb2 as ours_service
from hub.protocol.generated import model_config_pb2 as ours_config

from .conftest import ROOT


def _type_name(field: FieldDescriptor) -> str:
    if field.message_type is not None:
        return field.message_type.full_name
    if field.enum_type is not None:
        return field.enum_type.full_name
    return str(field.type)


def _compare(ours: Descriptor, theirs: Descriptor) -> None:
    assert ours.full_name == theirs.full_name
    for field in ours.fields:
        assert field.name in theirs.fields_by_name, f"{ours.full_name}.{field.name} is not in Triton's proto"
        other = theirs.fields_by_name[field.name]
        where = f"{ours.full_name}.{field.name}"
        assert field.number == other.number, where
        assert _type_name(field) == _type_name(other), where
        assert field.is_repeated == other.is_repeated, where
        assert (field.containing_oneof is None) == (other.containing_oneof is None), where
    for nested in ours.nested_types:
        _compare(nested, theirs.nested_types_by_name[nested.name])
    for enum in ours.enum_types:
        theirs_enum = theirs.enum_types_by_name[enum.name]
        assert {v.name: v.number for v in enum.values}.items() <= {v.name: v.number for v in theirs_enum.values}.items()


def test_service_methods_match_triton() -> None:
    ours = ours_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == "inference.GRPCInferenceService"

    def shape(service):  # type: ignore[no-untyped-def]
        return {
            m.name: (m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming)
            for m in service.methods
        }

    assert shape(ours) == shape(theirs)


@pytest.mark.parametrize("module_pair", ["service", "config"])
def test_messages_match_triton(module_pair: str) -> None:
    ours, theirs = {
        "service": (ours_service, triton_service),
        "config": (ours_config, triton_config),
    }[module_pair]
    for name, descriptor in ours.DESCRIPTOR.message_types_by_name.items():
        _compare(descriptor, theirs.DESCRIPTOR.message_types_by_name[name])
    for name, enum in ours.DESCRIPTOR.enum_types_by_name.items():
        theirs_enum = theirs.DESCRIPTOR.enum_types_by_name[name]
        assert [(v.name, v.number) for v in enum.values] == [(v.name, v.number) for v in theirs_enum.values]


def test_service_messages_are_complete() -> None:
    """Every message of Triton's service proto exists in ours (config messages may be a subset)."""
    assert set(triton_service.DESCRIPTOR.message_types_by_name) == set(ours_service.DESCRIPTOR.message_types_by_name)


def test_generated_code_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
