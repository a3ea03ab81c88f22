"""tf.train.Example without TensorFlow: the Example protocol buffer in protobuf's own runtime.

The messages below are TensorFlow's tensorflow/core/example/{feature,example}.proto (Apache 2.0),
written as protobuf text-format FileDescriptorProtos (what protoc compiles those .proto files to; the
file-level options, which only name other languages' packages, are left out). protobuf builds the
message classes from them, so serialisation is protobuf's, not ours: the same runtime that backs
tf.train.Example, hence the same bytes (tests/test_records.py checks both descriptors against
TensorFlow's and every record of a build against tf.train.Example).

TensorBoard 2.21 ships no copy of these two files (its compat/proto has event, summary, graph... but
not example/feature), and TensorFlow's own example_pb2 cannot be imported without running
tensorflow/__init__ (seconds, gigabytes). The classes live in a private descriptor pool so that they
never clash with TensorFlow's when both are loaded in one process.
"""
from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

FEATURE_PROTO = """
name: "tensorflow/core/example/feature.proto" package: "tensorflow" syntax: "proto3"
message_type { name: "BytesList"
  field { name: "value" number: 1 label: LABEL_REPEATED type: TYPE_BYTES } }
message_type { name: "FloatList"
  field { name: "value" number: 1 label: LABEL_REPEATED type: TYPE_FLOAT options { packed: true } } }
message_type { name: "Int64List"
  field { name: "value" number: 1 label: LABEL_REPEATED type: TYPE_INT64
          options { packed: true jstype: JS_STRING } } }
message_type { name: "Feature"
  field { name: "bytes_list" number: 1 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".tensorflow.BytesList" oneof_index: 0 }
  field { name: "float_list" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".tensorflow.FloatList" oneof_index: 0 }
  field { name: "int64_list" number: 3 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".tensorflow.Int64List" oneof_index: 0 }
  oneof_decl { name: "kind" } }
message_type { name: "Features"
  field { name: "feature" number: 1 label: LABEL_REPEATED type: TYPE_MESSAGE
          type_name: ".tensorflow.Features.FeatureEntry" }
  nested_type { name: "FeatureEntry"
    field { name: "key" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
    field { name: "value" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".tensorflow.Feature" }
    options { map_entry: true } } }
message_type { name: "FeatureList"
  field { name: "feature" number: 1 label: LABEL_REPEATED type: TYPE_MESSAGE type_name: ".tensorflow.Feature" } }
message_type { name: "FeatureLists"
  field { name: "feature_list" number: 1 label: LABEL_REPEATED type: TYPE_MESSAGE
          type_name: ".tensorflow.FeatureLists.FeatureListEntry" }
  nested_type { name: "FeatureListEntry"
    field { name: "key" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
    field { name: "value" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".tensorflow.FeatureList" }
    options { map_entry: true } } }
"""

EXAMPLE_PROTO = """
name: "tensorflow/core/example/example.proto" package: "tensorflow" syntax: "proto3"
dependency: "tensorflow/core/example/feature.proto"
message_type { name: "Example"
  field { name: "features" number: 1 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".tensorflow.Features" } }
message_type { name: "SequenceExample"
  field { name: "context" number: 1 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".tensorflow.Features" }
  field { name: "feature_lists" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".tensorflow.FeatureLists" } }
"""


def file_descriptor_protos() -> list:
    """The two FileDescriptorProtos, feature.proto first (example.proto depends on it)."""
    return [text_format.Parse(text, descriptor_pb2.FileDescriptorProto()) for text in (FEATURE_PROTO, EXAMPLE_PROTO)]


_POOL = descriptor_pool.DescriptorPool()
for _fdp in file_descriptor_protos():
    _POOL.Add(_fdp)


def _message(name: str):
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"tensorflow.{name}"))


BytesList = _message("BytesList")
FloatList = _message("FloatList")
Int64List = _message("Int64List")
Feature = _message("Feature")
Features = _message("Features")
FeatureList = _message("FeatureList")
FeatureLists = _message("FeatureLists")
Example = _message("Example")
SequenceExample = _message("SequenceExample")
