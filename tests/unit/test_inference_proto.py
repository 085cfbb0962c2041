"""Our Open Inference Protocol protos (protos/inference/) against tritonclient's compiled copy.

Wire compatibility means the same package, service and method names, and for every field the
same number, type and label (and the same name, for JSON and text format). tritonclient's
descriptors are read from its *_pb2.py files into a private descriptor pool: importing
tritonclient.grpc in the same process as our stubs fails, because both register the
messages `inference.*` in protobuf's default pool ("duplicate symbol").
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor

from gru_serve.grpc.generated.inference import grpc_service_pb2, model_config_pb2
from tests.support.oip import triton_class, triton_pool

SERVICE = "inference.GRPCInferenceService"
# Methods gru-serve serves: KServe v2's, and Triton's extensions tritonclient uses.
METHODS = {
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStreamInfer",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
}
# Fields of Triton's messages that our protos leave out on purpose (reserved there).
OMITTED = {
    "inference.ModelConfig": {
        "cc_model_filenames",
        "metric_tags",
        "optimization",
        "ensemble_scheduling",
        "model_warmup",
        "model_operations",
        "batch_input",
        "batch_output",
        "model_repository_agents",
        "model_metrics",
    },
}
# What the Triton repository exporter and the ModelConfig method need, at the least.
MODEL_CONFIG_NEEDS = {
    "name",
    "platform",
    "backend",
    "max_batch_size",
    "input",
    "output",
    "sequence_batching",
    "dynamic_batching",
    "instance_group",
    "model_transaction_policy",
    "parameters",
}


def _messages(container) -> Iterator[Descriptor]:
    for m in (
        container.message_types_by_name.values()
        if isinstance(container, FileDescriptor)
        else container.nested_types
    ):
        yield m
        yield from _messages(m)


def _enums(file: FileDescriptor) -> Iterator[EnumDescriptor]:
    yield from file.enum_types_by_name.values()
    for m in _messages(file):
        yield from m.enum_types


def _type_name(f) -> str:
    t = f.message_type or f.enum_type
    return t.full_name if t else ""


def differences(ours: FileDescriptor, theirs: descriptor_pool.DescriptorPool) -> list[str]:
    """Every way `ours` differs on the wire (or in field names) from the same messages in `theirs`."""
    problems = []
    for msg in _messages(ours):
        try:
            ref = theirs.FindMessageTypeByName(msg.full_name)
        except KeyError:
            problems.append(f"{msg.full_name}: no such message in tritonclient")
            continue
        for f in msg.fields:
            where = f"{msg.full_name}.{f.name} = {f.number}"
            if f.name in ref.fields_by_name and ref.fields_by_name[f.name].number != f.number:
                problems.append(f"{where}: tritonclient numbers it {ref.fields_by_name[f.name].number}")
            other = ref.fields_by_number.get(f.number)
            if other is None:
                problems.append(f"{where}: tritonclient has no field {f.number}")
                continue
            if other.name != f.name:
                problems.append(f"{where}: tritonclient names field {f.number} '{other.name}'")
            for what, a, b in (
                ("type", f.type, other.type),
                ("type name", _type_name(f), _type_name(other)),
                ("repeated", f.is_repeated, other.is_repeated),
                (
                    "oneof",
                    f.containing_oneof and f.containing_oneof.name,
                    other.containing_oneof and other.containing_oneof.name,
                ),
            ):
                if a != b:
                    problems.append(f"{where}: {what} {a!r}, tritonclient has {b!r}")
        missing = {f.name for f in ref.fields} - set(msg.fields_by_name) - OMITTED.get(msg.full_name, set())
        if missing:
            problems.append(f"{msg.full_name}: lacks tritonclient's fields {sorted(missing)}")
    for enum in _enums(ours):
        try:
            ref_enum = theirs.FindEnumTypeByName(enum.full_name)
        except KeyError:
            problems.append(f"{enum.full_name}: no such enum in tritonclient")
            continue
        values = {v.name: v.number for v in enum.values}
        ref_values = {v.name: v.number for v in ref_enum.values}
        if values != ref_values:
            problems.append(f"{enum.full_name}: values {values}, tritonclient has {ref_values}")
    for service in ours.services_by_name.values():
        ref_service = theirs.FindServiceByName(service.full_name)
        for m in service.methods:
            ref_m = ref_service.methods_by_name.get(m.name)
            if ref_m is None:
                problems.append(f"{service.full_name}/{m.name}: no such method in tritonclient")
                continue
            ours_sig = (
                m.input_type.full_name,
                m.output_type.full_name,
                m.client_streaming,
                m.server_streaming,
            )
            ref_sig = (
                ref_m.input_type.full_name,
                ref_m.output_type.full_name,
                ref_m.client_streaming,
                ref_m.server_streaming,
            )
            if ours_sig != ref_sig:
                problems.append(
                    f"{service.full_name}/{m.name}: (in, out, client stream, server stream) "
                    f"{ours_sig}, tritonclient has {ref_sig}"
                )
    return problems


@pytest.mark.parametrize("module", [model_config_pb2, grpc_service_pb2], ids=lambda m: m.__name__)
def test_messages_match_tritonclient(module) -> None:
    assert module.DESCRIPTOR.package == "inference"
    assert differences(module.DESCRIPTOR, triton_pool()) == []


def test_every_message_and_method_is_compared() -> None:
    names = {
        m.full_name for f in (model_config_pb2.DESCRIPTOR, grpc_service_pb2.DESCRIPTOR) for m in _messages(f)
    }
    assert {
        "inference.InferParameter",
        "inference.InferTensorContents",
        "inference.ModelInferRequest",
        "inference.ModelInferResponse",
        "inference.ModelStreamInferResponse",
        "inference.ModelConfigRequest",
        "inference.ModelConfigResponse",
        "inference.ModelConfig",
        "inference.ModelStatisticsRequest",
        "inference.ModelStatisticsResponse",
        "inference.ModelSequenceBatching.State",
        "inference.ModelInstanceGroup",
    } <= names
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == SERVICE  # the gRPC path is /inference.GRPCInferenceService/<Method>
    assert {m.name for m in service.methods} == METHODS
    stream = service.methods_by_name["ModelStreamInfer"]
    assert (stream.client_streaming, stream.server_streaming) == (True, True)
    assert set(model_config_pb2.ModelConfig.DESCRIPTOR.fields_by_name) >= MODEL_CONFIG_NEEDS


def test_a_wrong_field_number_is_caught() -> None:
    """The comparison fails when one field number differs (a copy of our protos, renumbered)."""
    pool = descriptor_pool.DescriptorPool()
    for module in (model_config_pb2, grpc_service_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        for msg in proto.message_type:
            if msg.name == "ModelInferRequest":
                next(f for f in msg.field if f.name == "raw_input_contents").number = 8
        pool.Add(proto)
    problems = differences(pool.FindFileByName("inference/grpc_service.proto"), triton_pool())
    assert problems == [
        "inference.ModelInferRequest.raw_input_contents = 8: tritonclient numbers it 7",
        "inference.ModelInferRequest.raw_input_contents = 8: tritonclient has no field 8",
    ]


def test_requests_and_responses_cross_the_wire() -> None:
    """Bytes written by our stubs parse as tritonclient's messages, and back, field for field."""
    ours = grpc_service_pb2.ModelInferRequest(model_name="timemachine-d2l", id="r1")
    ours.parameters["sequence_id"].uint64_param = 42
    ours.parameters["sequence_start"].bool_param = True
    tensor = ours.inputs.add(name="input_ids", datatype="INT64", shape=[1, 3])
    tensor.parameters["binary_data_size"].int64_param = 24
    ours.outputs.add(name="logits")
    ours.raw_input_contents.append(bytes(range(24)))
    theirs = triton_class("inference.ModelInferRequest").FromString(ours.SerializeToString())
    assert theirs.model_name == "timemachine-d2l" and theirs.id == "r1"
    assert theirs.parameters["sequence_id"].uint64_param == 42
    assert theirs.parameters["sequence_start"].bool_param
    assert (theirs.inputs[0].name, theirs.inputs[0].datatype, list(theirs.inputs[0].shape)) == (
        "input_ids",
        "INT64",
        [1, 3],
    )
    assert theirs.outputs[0].name == "logits"
    assert theirs.raw_input_contents == [bytes(range(24))]

    reply = triton_class("inference.ModelStreamInferResponse")(error_message="")
    reply.infer_response.model_name = "timemachine-d2l"
    reply.infer_response.outputs.add(name="logits", datatype="FP32", shape=[1, 3, 28])
    reply.infer_response.raw_output_contents.append(b"\0" * 4 * 84)
    back = grpc_service_pb2.ModelStreamInferResponse.FromString(reply.SerializeToString())
    assert back.infer_response.outputs[0].shape == [1, 3, 28]
    assert back.infer_response.raw_output_contents == [b"\0" * 4 * 84]

    config = grpc_service_pb2.ModelConfigResponse()
    config.config.sequence_batching.state.add(
        input_name="state", output_name="state_out", data_type=model_config_pb2.TYPE_FP32, dims=[1, 256]
    )
    parsed = triton_class("inference.ModelConfigResponse").FromString(config.SerializeToString())
    assert parsed.config.sequence_batching.state[0].output_name == "state_out"
    assert list(parsed.config.sequence_batching.state[0].dims) == [1, 256]
    assert parsed.config.sequence_batching.state[0].data_type == model_config_pb2.TYPE_FP32
