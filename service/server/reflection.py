"""Server reflection under both ``grpc.reflection.v1`` (what current grpcurl and GUI clients ask first) and
``grpc.reflection.v1alpha``.

grpcio-reflection ships only the v1alpha servicer. The v1 protocol is the same ``reflection.proto`` under
another package name, field for field, so one servicer answers both: the v1 method is registered with the
v1alpha messages (identical on the wire), and the v1 file descriptor, made from the v1alpha one by renaming its
package, is added to the descriptor pool so reflection can describe the v1 service too.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2

__all__ = ["enable_reflection", "V1_SERVICE_NAME", "V1ALPHA_SERVICE_NAME"]

V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME  # grpc.reflection.v1alpha.ServerReflection
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
_ALPHA, _V1 = "grpc.reflection.v1alpha", "grpc.reflection.v1"


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindServiceByName(V1_SERVICE_NAME)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = _V1
    proto.ClearField("options")

    def rename(type_name: str) -> str:
        return type_name.replace(f".{_ALPHA}.", f".{_V1}.")

    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = rename(field.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type, method.output_type = rename(method.input_type), rename(method.output_type)
    pool.AddSerializedFile(proto.SerializeToString())


def enable_reflection(server: grpc.aio.Server, service_names: tuple[str, ...]) -> None:
    """Serve reflection (both versions) listing ``service_names`` and the reflection services themselves."""
    _add_v1_descriptor(descriptor_pool.Default())
    names = (*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
    servicer = reflection.aio.ReflectionServicer(names)
    for service in (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME):
        handler = grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
        generic = grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": handler})
        server.add_generic_rpc_handlers((generic,))
