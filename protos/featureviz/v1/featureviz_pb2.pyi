import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_VALIDATING: _ClassVar[ModelState]
    MODEL_STATE_READY: _ClassVar[ModelState]
    MODEL_STATE_FAILED: _ClassVar[ModelState]

class DatasetSourceKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATASET_SOURCE_KIND_UNSPECIFIED: _ClassVar[DatasetSourceKind]
    DATASET_SOURCE_KIND_ZIP: _ClassVar[DatasetSourceKind]
    DATASET_SOURCE_KIND_TAR: _ClassVar[DatasetSourceKind]
    DATASET_SOURCE_KIND_FILES: _ClassVar[DatasetSourceKind]

class ExemplarOrder(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXEMPLAR_ORDER_UNSPECIFIED: _ClassVar[ExemplarOrder]
    EXEMPLAR_ORDER_MAX: _ClassVar[ExemplarOrder]
    EXEMPLAR_ORDER_MEAN: _ClassVar[ExemplarOrder]
    EXEMPLAR_ORDER_MIN: _ClassVar[ExemplarOrder]

class AtlasVariant(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ATLAS_VARIANT_UNSPECIFIED: _ClassVar[AtlasVariant]
    ATLAS_VARIANT_RENDER: _ClassVar[AtlasVariant]
    ATLAS_VARIANT_NEGATIVE: _ClassVar[AtlasVariant]
    ATLAS_VARIANT_DIVERSITY: _ClassVar[AtlasVariant]

class Parameterization(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PARAMETERIZATION_UNSPECIFIED: _ClassVar[Parameterization]
    PARAMETERIZATION_FFT: _ClassVar[Parameterization]
    PARAMETERIZATION_PIXEL: _ClassVar[Parameterization]
    PARAMETERIZATION_MACO: _ClassVar[Parameterization]
    PARAMETERIZATION_LAPLACIAN: _ClassVar[Parameterization]
    PARAMETERIZATION_GENERATOR: _ClassVar[Parameterization]

class LrSchedule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LR_SCHEDULE_UNSPECIFIED: _ClassVar[LrSchedule]
    LR_SCHEDULE_CONSTANT: _ClassVar[LrSchedule]
    LR_SCHEDULE_COSINE: _ClassVar[LrSchedule]
    LR_SCHEDULE_LINEAR: _ClassVar[LrSchedule]

class Transforms(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSFORMS_UNSPECIFIED: _ClassVar[Transforms]
    TRANSFORMS_STANDARD: _ClassVar[Transforms]
    TRANSFORMS_NONE: _ClassVar[Transforms]
    TRANSFORMS_COMPOSED: _ClassVar[Transforms]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_VALIDATING: ModelState
MODEL_STATE_READY: ModelState
MODEL_STATE_FAILED: ModelState
DATASET_SOURCE_KIND_UNSPECIFIED: DatasetSourceKind
DATASET_SOURCE_KIND_ZIP: DatasetSourceKind
DATASET_SOURCE_KIND_TAR: DatasetSourceKind
DATASET_SOURCE_KIND_FILES: DatasetSourceKind
EXEMPLAR_ORDER_UNSPECIFIED: ExemplarOrder
EXEMPLAR_ORDER_MAX: ExemplarOrder
EXEMPLAR_ORDER_MEAN: ExemplarOrder
EXEMPLAR_ORDER_MIN: ExemplarOrder
ATLAS_VARIANT_UNSPECIFIED: AtlasVariant
ATLAS_VARIANT_RENDER: AtlasVariant
ATLAS_VARIANT_NEGATIVE: AtlasVariant
ATLAS_VARIANT_DIVERSITY: AtlasVariant
PARAMETERIZATION_UNSPECIFIED: Parameterization
PARAMETERIZATION_FFT: Parameterization
PARAMETERIZATION_PIXEL: Parameterization
PARAMETERIZATION_MACO: Parameterization
PARAMETERIZATION_LAPLACIAN: Parameterization
PARAMETERIZATION_GENERATOR: Parameterization
LR_SCHEDULE_UNSPECIFIED: LrSchedule
LR_SCHEDULE_CONSTANT: LrSchedule
LR_SCHEDULE_COSINE: LrSchedule
LR_SCHEDULE_LINEAR: LrSchedule
TRANSFORMS_UNSPECIFIED: Transforms
TRANSFORMS_STANDARD: Transforms
TRANSFORMS_NONE: Transforms
TRANSFORMS_COMPOSED: Transforms
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class UploadHeader(_message.Message):
    __slots__ = ("sha256", "size_bytes", "display_name", "preprocess")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size_bytes: int
    display_name: str
    preprocess: Preprocess
    def __init__(self, sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., display_name: _Optional[str] = ..., preprocess: _Optional[_Union[Preprocess, _Mapping]] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("write_offset", "data", "finish_write")
    WRITE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    FINISH_WRITE_FIELD_NUMBER: _ClassVar[int]
    write_offset: int
    data: bytes
    finish_write: bool
    def __init__(self, write_offset: _Optional[int] = ..., data: _Optional[bytes] = ..., finish_write: _Optional[bool] = ...) -> None: ...

class UploadModelRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: UploadChunk
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[_Union[UploadChunk, _Mapping]] = ...) -> None: ...

class GetUploadRequest(_message.Message):
    __slots__ = ("sha256", "size_bytes")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size_bytes: int
    def __init__(self, sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class UploadStatus(_message.Message):
    __slots__ = ("sha256", "committed_bytes", "model_exists")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_EXISTS_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    committed_bytes: int
    model_exists: bool
    def __init__(self, sha256: _Optional[str] = ..., committed_bytes: _Optional[int] = ..., model_exists: _Optional[bool] = ...) -> None: ...

class Preprocess(_message.Message):
    __slots__ = ("mean", "std", "channel_order")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ORDER_FIELD_NUMBER: _ClassVar[int]
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    channel_order: str
    def __init__(self, mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., channel_order: _Optional[str] = ...) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("name", "layout", "channels", "height", "width", "batch", "default_height", "default_width", "preprocess")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_FIELD_NUMBER: _ClassVar[int]
    name: str
    layout: str
    channels: int
    height: int
    width: int
    batch: int
    default_height: int
    default_width: int
    preprocess: Preprocess
    def __init__(self, name: _Optional[str] = ..., layout: _Optional[str] = ..., channels: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., batch: _Optional[int] = ..., default_height: _Optional[int] = ..., default_width: _Optional[int] = ..., preprocess: _Optional[_Union[Preprocess, _Mapping]] = ...) -> None: ...

class CheckReport(_message.Message):
    __slots__ = ("max_rel_err", "max_rel_err_batch", "tolerance", "passed")
    MAX_REL_ERR_FIELD_NUMBER: _ClassVar[int]
    MAX_REL_ERR_BATCH_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    max_rel_err: float
    max_rel_err_batch: float
    tolerance: float
    passed: bool
    def __init__(self, max_rel_err: _Optional[float] = ..., max_rel_err_batch: _Optional[float] = ..., tolerance: _Optional[float] = ..., passed: _Optional[bool] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "sha256", "size_bytes", "display_name", "state", "input_spec", "layer_count", "logits_layer", "check", "create_time", "deduplicated", "failure_reason", "failure_message", "generator")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INPUT_SPEC_FIELD_NUMBER: _ClassVar[int]
    LAYER_COUNT_FIELD_NUMBER: _ClassVar[int]
    LOGITS_LAYER_FIELD_NUMBER: _ClassVar[int]
    CHECK_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    DEDUPLICATED_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    FAILURE_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    size_bytes: int
    display_name: str
    state: ModelState
    input_spec: InputSpec
    layer_count: int
    logits_layer: str
    check: CheckReport
    create_time: _timestamp_pb2.Timestamp
    deduplicated: bool
    failure_reason: str
    failure_message: str
    generator: GeneratorInfo
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., display_name: _Optional[str] = ..., state: _Optional[_Union[ModelState, str]] = ..., input_spec: _Optional[_Union[InputSpec, _Mapping]] = ..., layer_count: _Optional[int] = ..., logits_layer: _Optional[str] = ..., check: _Optional[_Union[CheckReport, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., deduplicated: _Optional[bool] = ..., failure_reason: _Optional[str] = ..., failure_message: _Optional[str] = ..., generator: _Optional[_Union[GeneratorInfo, _Mapping]] = ...) -> None: ...

class GeneratorInfo(_message.Message):
    __slots__ = ("latent_size", "channels", "height", "width", "output_min", "output_max", "last_op")
    LATENT_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_MIN_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_MAX_FIELD_NUMBER: _ClassVar[int]
    LAST_OP_FIELD_NUMBER: _ClassVar[int]
    latent_size: int
    channels: int
    height: int
    width: int
    output_min: float
    output_max: float
    last_op: str
    def __init__(self, latent_size: _Optional[int] = ..., channels: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., output_min: _Optional[float] = ..., output_max: _Optional[float] = ..., last_op: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "next_page_token")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    next_page_token: str
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Layer(_message.Message):
    __slots__ = ("name", "aliases", "op_type", "shape", "channels", "spatial", "depth", "is_logits", "pre_activation_of", "layout")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    OP_TYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    SPATIAL_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    IS_LOGITS_FIELD_NUMBER: _ClassVar[int]
    PRE_ACTIVATION_OF_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    op_type: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    channels: int
    spatial: bool
    depth: int
    is_logits: bool
    pre_activation_of: str
    layout: str
    def __init__(self, name: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ..., op_type: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., channels: _Optional[int] = ..., spatial: _Optional[bool] = ..., depth: _Optional[int] = ..., is_logits: _Optional[bool] = ..., pre_activation_of: _Optional[str] = ..., layout: _Optional[str] = ...) -> None: ...

class ListLayersRequest(_message.Message):
    __slots__ = ("model", "page_size", "page_token", "filter", "spatial_only")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    SPATIAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    model: str
    page_size: int
    page_token: str
    filter: str
    spatial_only: bool
    def __init__(self, model: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., filter: _Optional[str] = ..., spatial_only: _Optional[bool] = ...) -> None: ...

class ListLayersResponse(_message.Message):
    __slots__ = ("layers", "next_page_token", "total_size")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[Layer]
    next_page_token: str
    total_size: int
    def __init__(self, layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class DatasetFile(_message.Message):
    __slots__ = ("name", "size_bytes", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    size_bytes: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class DatasetUploadHeader(_message.Message):
    __slots__ = ("sha256", "size_bytes", "display_name", "kind", "files")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size_bytes: int
    display_name: str
    kind: DatasetSourceKind
    files: _containers.RepeatedCompositeFieldContainer[DatasetFile]
    def __init__(self, sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., display_name: _Optional[str] = ..., kind: _Optional[_Union[DatasetSourceKind, str]] = ..., files: _Optional[_Iterable[_Union[DatasetFile, _Mapping]]] = ...) -> None: ...

class UploadDatasetRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: DatasetUploadHeader
    chunk: UploadChunk
    def __init__(self, header: _Optional[_Union[DatasetUploadHeader, _Mapping]] = ..., chunk: _Optional[_Union[UploadChunk, _Mapping]] = ...) -> None: ...

class GetDatasetUploadRequest(_message.Message):
    __slots__ = ("sha256", "size_bytes")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size_bytes: int
    def __init__(self, sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class SkippedFiles(_message.Message):
    __slots__ = ("cause", "count", "names", "detail")
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    cause: str
    count: int
    names: _containers.RepeatedScalarFieldContainer[str]
    detail: str
    def __init__(self, cause: _Optional[str] = ..., count: _Optional[int] = ..., names: _Optional[_Iterable[str]] = ..., detail: _Optional[str] = ...) -> None: ...

class ConvertedImages(_message.Message):
    __slots__ = ("kind", "count", "names")
    KIND_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    kind: str
    count: int
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, kind: _Optional[str] = ..., count: _Optional[int] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

class DatasetReport(_message.Message):
    __slots__ = ("images", "files", "skipped", "skipped_by_cause", "converted", "formats")
    class FormatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_BY_CAUSE_FIELD_NUMBER: _ClassVar[int]
    CONVERTED_FIELD_NUMBER: _ClassVar[int]
    FORMATS_FIELD_NUMBER: _ClassVar[int]
    images: int
    files: int
    skipped: int
    skipped_by_cause: _containers.RepeatedCompositeFieldContainer[SkippedFiles]
    converted: _containers.RepeatedCompositeFieldContainer[ConvertedImages]
    formats: _containers.ScalarMap[str, int]
    def __init__(self, images: _Optional[int] = ..., files: _Optional[int] = ..., skipped: _Optional[int] = ..., skipped_by_cause: _Optional[_Iterable[_Union[SkippedFiles, _Mapping]]] = ..., converted: _Optional[_Iterable[_Union[ConvertedImages, _Mapping]]] = ..., formats: _Optional[_Mapping[str, int]] = ...) -> None: ...

class Dataset(_message.Message):
    __slots__ = ("name", "id", "display_name", "image_count", "size_bytes", "report", "create_time", "deduplicated", "priors")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    DEDUPLICATED_FIELD_NUMBER: _ClassVar[int]
    PRIORS_FIELD_NUMBER: _ClassVar[int]
    name: str
    id: str
    display_name: str
    image_count: int
    size_bytes: int
    report: DatasetReport
    create_time: _timestamp_pb2.Timestamp
    deduplicated: bool
    priors: _containers.RepeatedCompositeFieldContainer[DatasetPrior]
    def __init__(self, name: _Optional[str] = ..., id: _Optional[str] = ..., display_name: _Optional[str] = ..., image_count: _Optional[int] = ..., size_bytes: _Optional[int] = ..., report: _Optional[_Union[DatasetReport, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., deduplicated: _Optional[bool] = ..., priors: _Optional[_Iterable[_Union[DatasetPrior, _Mapping]]] = ...) -> None: ...

class DatasetPrior(_message.Message):
    __slots__ = ("channels", "color", "mean", "decay", "alpha", "images", "patch_prior", "held_out_log_likelihood", "train_log_likelihood", "components", "patch_size", "patches", "patch_images")
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    COLOR_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    DECAY_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PATCH_PRIOR_FIELD_NUMBER: _ClassVar[int]
    HELD_OUT_LOG_LIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOG_LIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    PATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PATCHES_FIELD_NUMBER: _ClassVar[int]
    PATCH_IMAGES_FIELD_NUMBER: _ClassVar[int]
    channels: int
    color: _containers.RepeatedScalarFieldContainer[float]
    mean: _containers.RepeatedScalarFieldContainer[float]
    decay: float
    alpha: float
    images: int
    patch_prior: bool
    held_out_log_likelihood: float
    train_log_likelihood: float
    components: int
    patch_size: int
    patches: int
    patch_images: int
    def __init__(self, channels: _Optional[int] = ..., color: _Optional[_Iterable[float]] = ..., mean: _Optional[_Iterable[float]] = ..., decay: _Optional[float] = ..., alpha: _Optional[float] = ..., images: _Optional[int] = ..., patch_prior: _Optional[bool] = ..., held_out_log_likelihood: _Optional[float] = ..., train_log_likelihood: _Optional[float] = ..., components: _Optional[int] = ..., patch_size: _Optional[int] = ..., patches: _Optional[int] = ..., patch_images: _Optional[int] = ...) -> None: ...

class DatasetImage(_message.Message):
    __slots__ = ("name", "sha256", "size_bytes", "format", "width", "height", "converted")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CONVERTED_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    size_bytes: int
    format: str
    width: int
    height: int
    converted: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., format: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., converted: _Optional[_Iterable[str]] = ...) -> None: ...

class GetDatasetRequest(_message.Message):
    __slots__ = ("dataset",)
    DATASET_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    def __init__(self, dataset: _Optional[str] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets", "next_page_token")
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[Dataset]
    next_page_token: str
    def __init__(self, datasets: _Optional[_Iterable[_Union[Dataset, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListDatasetImagesRequest(_message.Message):
    __slots__ = ("dataset", "page_size", "page_token")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    page_size: int
    page_token: str
    def __init__(self, dataset: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDatasetImagesResponse(_message.Message):
    __slots__ = ("images", "next_page_token", "total_size")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[DatasetImage]
    next_page_token: str
    total_size: int
    def __init__(self, images: _Optional[_Iterable[_Union[DatasetImage, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class DeleteDatasetRequest(_message.Message):
    __slots__ = ("dataset",)
    DATASET_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    def __init__(self, dataset: _Optional[str] = ...) -> None: ...

class DeleteDatasetResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExemplarIndexSpec(_message.Message):
    __slots__ = ("dataset", "layers", "k", "batch_size")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    layers: _containers.RepeatedScalarFieldContainer[str]
    k: int
    batch_size: int
    def __init__(self, dataset: _Optional[str] = ..., layers: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., batch_size: _Optional[int] = ...) -> None: ...

class ExemplarIndexResult(_message.Message):
    __slots__ = ("index", "dataset", "layers", "images", "skipped", "k", "size", "cached", "channels")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    index: str
    dataset: str
    layers: _containers.RepeatedScalarFieldContainer[str]
    images: int
    skipped: int
    k: int
    size: ImageSize
    cached: bool
    channels: int
    def __init__(self, index: _Optional[str] = ..., dataset: _Optional[str] = ..., layers: _Optional[_Iterable[str]] = ..., images: _Optional[int] = ..., skipped: _Optional[int] = ..., k: _Optional[int] = ..., size: _Optional[_Union[ImageSize, _Mapping]] = ..., cached: _Optional[bool] = ..., channels: _Optional[int] = ...) -> None: ...

class GetExemplarsRequest(_message.Message):
    __slots__ = ("model", "dataset", "layer", "channel", "order", "k", "size")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    model: str
    dataset: str
    layer: str
    channel: int
    order: ExemplarOrder
    k: int
    size: ImageSize
    def __init__(self, model: _Optional[str] = ..., dataset: _Optional[str] = ..., layer: _Optional[str] = ..., channel: _Optional[int] = ..., order: _Optional[_Union[ExemplarOrder, str]] = ..., k: _Optional[int] = ..., size: _Optional[_Union[ImageSize, _Mapping]] = ...) -> None: ...

class CropBox(_message.Message):
    __slots__ = ("x0", "y0", "x1", "y1")
    X0_FIELD_NUMBER: _ClassVar[int]
    Y0_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    x0: int
    y0: int
    x1: int
    y1: int
    def __init__(self, x0: _Optional[int] = ..., y0: _Optional[int] = ..., x1: _Optional[int] = ..., y1: _Optional[int] = ...) -> None: ...

class Exemplar(_message.Message):
    __slots__ = ("rank", "image", "name", "value", "x", "y", "box", "image_box", "whole")
    RANK_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    IMAGE_BOX_FIELD_NUMBER: _ClassVar[int]
    WHOLE_FIELD_NUMBER: _ClassVar[int]
    rank: int
    image: str
    name: str
    value: float
    x: int
    y: int
    box: CropBox
    image_box: CropBox
    whole: bool
    def __init__(self, rank: _Optional[int] = ..., image: _Optional[str] = ..., name: _Optional[str] = ..., value: _Optional[float] = ..., x: _Optional[int] = ..., y: _Optional[int] = ..., box: _Optional[_Union[CropBox, _Mapping]] = ..., image_box: _Optional[_Union[CropBox, _Mapping]] = ..., whole: _Optional[bool] = ...) -> None: ...

class GetExemplarsResponse(_message.Message):
    __slots__ = ("exemplars", "layer", "channel", "order", "index", "size", "images", "p50", "p99", "max", "field_size", "field_stride", "whole")
    EXEMPLARS_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    P50_FIELD_NUMBER: _ClassVar[int]
    P99_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    FIELD_SIZE_FIELD_NUMBER: _ClassVar[int]
    FIELD_STRIDE_FIELD_NUMBER: _ClassVar[int]
    WHOLE_FIELD_NUMBER: _ClassVar[int]
    exemplars: _containers.RepeatedCompositeFieldContainer[Exemplar]
    layer: str
    channel: int
    order: ExemplarOrder
    index: str
    size: ImageSize
    images: int
    p50: float
    p99: float
    max: float
    field_size: int
    field_stride: int
    whole: bool
    def __init__(self, exemplars: _Optional[_Iterable[_Union[Exemplar, _Mapping]]] = ..., layer: _Optional[str] = ..., channel: _Optional[int] = ..., order: _Optional[_Union[ExemplarOrder, str]] = ..., index: _Optional[str] = ..., size: _Optional[_Union[ImageSize, _Mapping]] = ..., images: _Optional[int] = ..., p50: _Optional[float] = ..., p99: _Optional[float] = ..., max: _Optional[float] = ..., field_size: _Optional[int] = ..., field_stride: _Optional[int] = ..., whole: _Optional[bool] = ...) -> None: ...

class GetDatasetImageRequest(_message.Message):
    __slots__ = ("dataset", "image", "box", "max_side")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    MAX_SIDE_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    image: str
    box: CropBox
    max_side: int
    def __init__(self, dataset: _Optional[str] = ..., image: _Optional[str] = ..., box: _Optional[_Union[CropBox, _Mapping]] = ..., max_side: _Optional[int] = ...) -> None: ...

class DatasetImageData(_message.Message):
    __slots__ = ("png", "width", "height", "name", "sha256")
    PNG_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    png: bytes
    width: int
    height: int
    name: str
    sha256: str
    def __init__(self, png: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., name: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class Objective(_message.Message):
    __slots__ = ("neuron", "channel", "layer", "logit", "prob", "direction", "neuron_direction", "interpolate", "diversity", "alignment", "l1", "l2", "tv", "blur", "sum", "scale", "batch", "bilateral", "prior", "match")
    NEURON_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    PROB_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    NEURON_DIRECTION_FIELD_NUMBER: _ClassVar[int]
    INTERPOLATE_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    L1_FIELD_NUMBER: _ClassVar[int]
    L2_FIELD_NUMBER: _ClassVar[int]
    TV_FIELD_NUMBER: _ClassVar[int]
    BLUR_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    BILATERAL_FIELD_NUMBER: _ClassVar[int]
    PRIOR_FIELD_NUMBER: _ClassVar[int]
    MATCH_FIELD_NUMBER: _ClassVar[int]
    neuron: NeuronObjective
    channel: ChannelObjective
    layer: LayerObjective
    logit: ClassObjective
    prob: ClassObjective
    direction: DirectionObjective
    neuron_direction: NeuronDirectionObjective
    interpolate: InterpolateObjective
    diversity: LayerObjective
    alignment: AlignmentObjective
    l1: ConstantObjective
    l2: ConstantObjective
    tv: TotalVariationObjective
    blur: BlurObjective
    sum: SumObjective
    scale: ScaleObjective
    batch: BatchObjective
    bilateral: BilateralObjective
    prior: PriorObjective
    match: MatchObjective
    def __init__(self, neuron: _Optional[_Union[NeuronObjective, _Mapping]] = ..., channel: _Optional[_Union[ChannelObjective, _Mapping]] = ..., layer: _Optional[_Union[LayerObjective, _Mapping]] = ..., logit: _Optional[_Union[ClassObjective, _Mapping]] = ..., prob: _Optional[_Union[ClassObjective, _Mapping]] = ..., direction: _Optional[_Union[DirectionObjective, _Mapping]] = ..., neuron_direction: _Optional[_Union[NeuronDirectionObjective, _Mapping]] = ..., interpolate: _Optional[_Union[InterpolateObjective, _Mapping]] = ..., diversity: _Optional[_Union[LayerObjective, _Mapping]] = ..., alignment: _Optional[_Union[AlignmentObjective, _Mapping]] = ..., l1: _Optional[_Union[ConstantObjective, _Mapping]] = ..., l2: _Optional[_Union[ConstantObjective, _Mapping]] = ..., tv: _Optional[_Union[TotalVariationObjective, _Mapping]] = ..., blur: _Optional[_Union[BlurObjective, _Mapping]] = ..., sum: _Optional[_Union[SumObjective, _Mapping]] = ..., scale: _Optional[_Union[ScaleObjective, _Mapping]] = ..., batch: _Optional[_Union[BatchObjective, _Mapping]] = ..., bilateral: _Optional[_Union[BilateralObjective, _Mapping]] = ..., prior: _Optional[_Union[PriorObjective, _Mapping]] = ..., match: _Optional[_Union[MatchObjective, _Mapping]] = ...) -> None: ...

class NeuronObjective(_message.Message):
    __slots__ = ("layer", "channel", "x", "y")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    layer: str
    channel: int
    x: int
    y: int
    def __init__(self, layer: _Optional[str] = ..., channel: _Optional[int] = ..., x: _Optional[int] = ..., y: _Optional[int] = ...) -> None: ...

class ChannelObjective(_message.Message):
    __slots__ = ("layer", "channel")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    layer: str
    channel: int
    def __init__(self, layer: _Optional[str] = ..., channel: _Optional[int] = ...) -> None: ...

class LayerObjective(_message.Message):
    __slots__ = ("layer",)
    LAYER_FIELD_NUMBER: _ClassVar[int]
    layer: str
    def __init__(self, layer: _Optional[str] = ...) -> None: ...

class ClassObjective(_message.Message):
    __slots__ = ("index",)
    INDEX_FIELD_NUMBER: _ClassVar[int]
    index: int
    def __init__(self, index: _Optional[int] = ...) -> None: ...

class DirectionObjective(_message.Message):
    __slots__ = ("layer", "vector", "cossim_pow")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    COSSIM_POW_FIELD_NUMBER: _ClassVar[int]
    layer: str
    vector: _containers.RepeatedScalarFieldContainer[float]
    cossim_pow: float
    def __init__(self, layer: _Optional[str] = ..., vector: _Optional[_Iterable[float]] = ..., cossim_pow: _Optional[float] = ...) -> None: ...

class NeuronDirectionObjective(_message.Message):
    __slots__ = ("layer", "vector", "x", "y", "cossim_pow")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    COSSIM_POW_FIELD_NUMBER: _ClassVar[int]
    layer: str
    vector: _containers.RepeatedScalarFieldContainer[float]
    x: int
    y: int
    cossim_pow: float
    def __init__(self, layer: _Optional[str] = ..., vector: _Optional[_Iterable[float]] = ..., x: _Optional[int] = ..., y: _Optional[int] = ..., cossim_pow: _Optional[float] = ...) -> None: ...

class InterpolateObjective(_message.Message):
    __slots__ = ("a", "b")
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    a: Objective
    b: Objective
    def __init__(self, a: _Optional[_Union[Objective, _Mapping]] = ..., b: _Optional[_Union[Objective, _Mapping]] = ...) -> None: ...

class AlignmentObjective(_message.Message):
    __slots__ = ("layer", "decay")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    DECAY_FIELD_NUMBER: _ClassVar[int]
    layer: str
    decay: float
    def __init__(self, layer: _Optional[str] = ..., decay: _Optional[float] = ...) -> None: ...

class ConstantObjective(_message.Message):
    __slots__ = ("constant",)
    CONSTANT_FIELD_NUMBER: _ClassVar[int]
    constant: float
    def __init__(self, constant: _Optional[float] = ...) -> None: ...

class TotalVariationObjective(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BlurObjective(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BilateralObjective(_message.Message):
    __slots__ = ("sigma_space", "sigma_color")
    SIGMA_SPACE_FIELD_NUMBER: _ClassVar[int]
    SIGMA_COLOR_FIELD_NUMBER: _ClassVar[int]
    sigma_space: float
    sigma_color: float
    def __init__(self, sigma_space: _Optional[float] = ..., sigma_color: _Optional[float] = ...) -> None: ...

class PriorObjective(_message.Message):
    __slots__ = ("dataset",)
    DATASET_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    def __init__(self, dataset: _Optional[str] = ...) -> None: ...

class MatchObjective(_message.Message):
    __slots__ = ("layer", "channel", "index", "k", "match_layer")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    MATCH_LAYER_FIELD_NUMBER: _ClassVar[int]
    layer: str
    channel: int
    index: str
    k: int
    match_layer: str
    def __init__(self, layer: _Optional[str] = ..., channel: _Optional[int] = ..., index: _Optional[str] = ..., k: _Optional[int] = ..., match_layer: _Optional[str] = ...) -> None: ...

class SumObjective(_message.Message):
    __slots__ = ("terms",)
    TERMS_FIELD_NUMBER: _ClassVar[int]
    terms: _containers.RepeatedCompositeFieldContainer[Objective]
    def __init__(self, terms: _Optional[_Iterable[_Union[Objective, _Mapping]]] = ...) -> None: ...

class ScaleObjective(_message.Message):
    __slots__ = ("factor", "objective")
    FACTOR_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    factor: float
    objective: Objective
    def __init__(self, factor: _Optional[float] = ..., objective: _Optional[_Union[Objective, _Mapping]] = ...) -> None: ...

class BatchObjective(_message.Message):
    __slots__ = ("index", "objective")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    index: int
    objective: Objective
    def __init__(self, index: _Optional[int] = ..., objective: _Optional[_Union[Objective, _Mapping]] = ...) -> None: ...

class AtlasSpec(_message.Message):
    __slots__ = ("layers", "op_types", "min_depth", "max_depth", "channels", "dataset", "negative", "diversity")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    OP_TYPES_FIELD_NUMBER: _ClassVar[int]
    MIN_DEPTH_FIELD_NUMBER: _ClassVar[int]
    MAX_DEPTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedScalarFieldContainer[str]
    op_types: _containers.RepeatedScalarFieldContainer[str]
    min_depth: int
    max_depth: int
    channels: int
    dataset: str
    negative: bool
    diversity: int
    def __init__(self, layers: _Optional[_Iterable[str]] = ..., op_types: _Optional[_Iterable[str]] = ..., min_depth: _Optional[int] = ..., max_depth: _Optional[int] = ..., channels: _Optional[int] = ..., dataset: _Optional[str] = ..., negative: _Optional[bool] = ..., diversity: _Optional[int] = ...) -> None: ...

class AtlasLayerProgress(_message.Message):
    __slots__ = ("layer", "depth", "units", "done")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    layer: str
    depth: int
    units: int
    done: int
    def __init__(self, layer: _Optional[str] = ..., depth: _Optional[int] = ..., units: _Optional[int] = ..., done: _Optional[int] = ...) -> None: ...

class AtlasResult(_message.Message):
    __slots__ = ("units", "done", "rendered", "cached", "device_seconds", "layers", "units_per_hour", "eta_seconds", "failed", "index_job", "joined", "variants_done")
    UNITS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    RENDERED_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    UNITS_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    INDEX_JOB_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_DONE_FIELD_NUMBER: _ClassVar[int]
    units: int
    done: int
    rendered: int
    cached: int
    device_seconds: float
    layers: _containers.RepeatedCompositeFieldContainer[AtlasLayerProgress]
    units_per_hour: float
    eta_seconds: float
    failed: int
    index_job: str
    joined: int
    variants_done: int
    def __init__(self, units: _Optional[int] = ..., done: _Optional[int] = ..., rendered: _Optional[int] = ..., cached: _Optional[int] = ..., device_seconds: _Optional[float] = ..., layers: _Optional[_Iterable[_Union[AtlasLayerProgress, _Mapping]]] = ..., units_per_hour: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., failed: _Optional[int] = ..., index_job: _Optional[str] = ..., joined: _Optional[int] = ..., variants_done: _Optional[int] = ...) -> None: ...

class AtlasUnit(_message.Message):
    __slots__ = ("index", "layer", "channel", "key", "done", "cached", "objective", "device_seconds", "device", "width", "height", "exemplar_index", "dataset_p50", "dataset_p99", "dataset_max", "render_score", "activation_ratio", "selectivity", "dead", "negative_done", "diversity_done")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    EXEMPLAR_INDEX_FIELD_NUMBER: _ClassVar[int]
    DATASET_P50_FIELD_NUMBER: _ClassVar[int]
    DATASET_P99_FIELD_NUMBER: _ClassVar[int]
    DATASET_MAX_FIELD_NUMBER: _ClassVar[int]
    RENDER_SCORE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_RATIO_FIELD_NUMBER: _ClassVar[int]
    SELECTIVITY_FIELD_NUMBER: _ClassVar[int]
    DEAD_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_DONE_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_DONE_FIELD_NUMBER: _ClassVar[int]
    index: int
    layer: str
    channel: int
    key: str
    done: bool
    cached: bool
    objective: float
    device_seconds: float
    device: str
    width: int
    height: int
    exemplar_index: str
    dataset_p50: float
    dataset_p99: float
    dataset_max: float
    render_score: float
    activation_ratio: float
    selectivity: float
    dead: bool
    negative_done: bool
    diversity_done: int
    def __init__(self, index: _Optional[int] = ..., layer: _Optional[str] = ..., channel: _Optional[int] = ..., key: _Optional[str] = ..., done: _Optional[bool] = ..., cached: _Optional[bool] = ..., objective: _Optional[float] = ..., device_seconds: _Optional[float] = ..., device: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., exemplar_index: _Optional[str] = ..., dataset_p50: _Optional[float] = ..., dataset_p99: _Optional[float] = ..., dataset_max: _Optional[float] = ..., render_score: _Optional[float] = ..., activation_ratio: _Optional[float] = ..., selectivity: _Optional[float] = ..., dead: _Optional[bool] = ..., negative_done: _Optional[bool] = ..., diversity_done: _Optional[int] = ...) -> None: ...

class ListAtlasUnitsRequest(_message.Message):
    __slots__ = ("job", "layer", "page_size", "page_token")
    JOB_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    job: str
    layer: str
    page_size: int
    page_token: str
    def __init__(self, job: _Optional[str] = ..., layer: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAtlasUnitsResponse(_message.Message):
    __slots__ = ("units", "next_page_token", "progress")
    UNITS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    units: _containers.RepeatedCompositeFieldContainer[AtlasUnit]
    next_page_token: str
    progress: AtlasResult
    def __init__(self, units: _Optional[_Iterable[_Union[AtlasUnit, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., progress: _Optional[_Union[AtlasResult, _Mapping]] = ...) -> None: ...

class GetAtlasUnitRequest(_message.Message):
    __slots__ = ("job", "index", "variant", "image")
    JOB_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    job: str
    index: int
    variant: AtlasVariant
    image: int
    def __init__(self, job: _Optional[str] = ..., index: _Optional[int] = ..., variant: _Optional[_Union[AtlasVariant, str]] = ..., image: _Optional[int] = ...) -> None: ...

class AtlasUnitImage(_message.Message):
    __slots__ = ("unit", "png")
    UNIT_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    unit: AtlasUnit
    png: bytes
    def __init__(self, unit: _Optional[_Union[AtlasUnit, _Mapping]] = ..., png: _Optional[bytes] = ...) -> None: ...

class ImageSize(_message.Message):
    __slots__ = ("height", "width")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("model", "objective", "steps", "lr", "size", "batch", "seed", "param", "decay", "transforms", "init_image", "preprocess", "preview_every", "preview_max_side", "exclusive", "judge", "lr_schedule", "lr_warmup", "plateau", "plateau_window", "exemplar_index", "atlas", "prior_dataset", "generator")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PARAM_FIELD_NUMBER: _ClassVar[int]
    DECAY_FIELD_NUMBER: _ClassVar[int]
    TRANSFORMS_FIELD_NUMBER: _ClassVar[int]
    INIT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_MAX_SIDE_FIELD_NUMBER: _ClassVar[int]
    EXCLUSIVE_FIELD_NUMBER: _ClassVar[int]
    JUDGE_FIELD_NUMBER: _ClassVar[int]
    LR_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    LR_WARMUP_FIELD_NUMBER: _ClassVar[int]
    PLATEAU_FIELD_NUMBER: _ClassVar[int]
    PLATEAU_WINDOW_FIELD_NUMBER: _ClassVar[int]
    EXEMPLAR_INDEX_FIELD_NUMBER: _ClassVar[int]
    ATLAS_FIELD_NUMBER: _ClassVar[int]
    PRIOR_DATASET_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    model: str
    objective: Objective
    steps: int
    lr: float
    size: ImageSize
    batch: int
    seed: int
    param: Parameterization
    decay: float
    transforms: Transforms
    init_image: bytes
    preprocess: Preprocess
    preview_every: int
    preview_max_side: int
    exclusive: bool
    judge: Judge
    lr_schedule: LrSchedule
    lr_warmup: int
    plateau: float
    plateau_window: int
    exemplar_index: ExemplarIndexSpec
    atlas: AtlasSpec
    prior_dataset: str
    generator: GeneratorSpec
    def __init__(self, model: _Optional[str] = ..., objective: _Optional[_Union[Objective, _Mapping]] = ..., steps: _Optional[int] = ..., lr: _Optional[float] = ..., size: _Optional[_Union[ImageSize, _Mapping]] = ..., batch: _Optional[int] = ..., seed: _Optional[int] = ..., param: _Optional[_Union[Parameterization, str]] = ..., decay: _Optional[float] = ..., transforms: _Optional[_Union[Transforms, str]] = ..., init_image: _Optional[bytes] = ..., preprocess: _Optional[_Union[Preprocess, _Mapping]] = ..., preview_every: _Optional[int] = ..., preview_max_side: _Optional[int] = ..., exclusive: _Optional[bool] = ..., judge: _Optional[_Union[Judge, _Mapping]] = ..., lr_schedule: _Optional[_Union[LrSchedule, str]] = ..., lr_warmup: _Optional[int] = ..., plateau: _Optional[float] = ..., plateau_window: _Optional[int] = ..., exemplar_index: _Optional[_Union[ExemplarIndexSpec, _Mapping]] = ..., atlas: _Optional[_Union[AtlasSpec, _Mapping]] = ..., prior_dataset: _Optional[str] = ..., generator: _Optional[_Union[GeneratorSpec, _Mapping]] = ...) -> None: ...

class GeneratorSpec(_message.Message):
    __slots__ = ("model", "latent_l2")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LATENT_L2_FIELD_NUMBER: _ClassVar[int]
    model: str
    latent_l2: float
    def __init__(self, model: _Optional[str] = ..., latent_l2: _Optional[float] = ...) -> None: ...

class Judge(_message.Message):
    __slots__ = ("model", "preprocess")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_FIELD_NUMBER: _ClassVar[int]
    model: str
    preprocess: Preprocess
    def __init__(self, model: _Optional[str] = ..., preprocess: _Optional[_Union[Preprocess, _Mapping]] = ...) -> None: ...

class JudgeScore(_message.Message):
    __slots__ = ("target", "rank", "probability", "top_classes", "top_probabilities")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    TOP_CLASSES_FIELD_NUMBER: _ClassVar[int]
    TOP_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    target: int
    rank: int
    probability: float
    top_classes: _containers.RepeatedScalarFieldContainer[int]
    top_probabilities: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, target: _Optional[int] = ..., rank: _Optional[int] = ..., probability: _Optional[float] = ..., top_classes: _Optional[_Iterable[int]] = ..., top_probabilities: _Optional[_Iterable[float]] = ...) -> None: ...

class RenderedImage(_message.Message):
    __slots__ = ("index", "png", "width", "height", "objective_start", "objective_end", "judge")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_START_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_END_FIELD_NUMBER: _ClassVar[int]
    JUDGE_FIELD_NUMBER: _ClassVar[int]
    index: int
    png: bytes
    width: int
    height: int
    objective_start: float
    objective_end: float
    judge: JudgeScore
    def __init__(self, index: _Optional[int] = ..., png: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., objective_start: _Optional[float] = ..., objective_end: _Optional[float] = ..., judge: _Optional[_Union[JudgeScore, _Mapping]] = ...) -> None: ...

class JobResult(_message.Message):
    __slots__ = ("images", "steps_done", "seconds_per_step", "phase_seconds", "objective_description", "stopped_at", "exemplar_index", "atlas", "device_seconds")
    class PhaseSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    STEPS_DONE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    PHASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    STOPPED_AT_FIELD_NUMBER: _ClassVar[int]
    EXEMPLAR_INDEX_FIELD_NUMBER: _ClassVar[int]
    ATLAS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[RenderedImage]
    steps_done: int
    seconds_per_step: float
    phase_seconds: _containers.ScalarMap[str, float]
    objective_description: str
    stopped_at: int
    exemplar_index: ExemplarIndexResult
    atlas: AtlasResult
    device_seconds: float
    def __init__(self, images: _Optional[_Iterable[_Union[RenderedImage, _Mapping]]] = ..., steps_done: _Optional[int] = ..., seconds_per_step: _Optional[float] = ..., phase_seconds: _Optional[_Mapping[str, float]] = ..., objective_description: _Optional[str] = ..., stopped_at: _Optional[int] = ..., exemplar_index: _Optional[_Union[ExemplarIndexResult, _Mapping]] = ..., atlas: _Optional[_Union[AtlasResult, _Mapping]] = ..., device_seconds: _Optional[float] = ...) -> None: ...

class JobError(_message.Message):
    __slots__ = ("code", "reason", "message", "field")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    code: str
    reason: str
    message: str
    field: str
    def __init__(self, code: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., field: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "name", "request_id", "state", "spec", "step", "steps", "objective", "create_time", "start_time", "end_time", "result", "error", "attempts", "last_seq", "queue_position", "objective_text", "worker")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_TEXT_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    request_id: str
    state: JobState
    spec: JobSpec
    step: int
    steps: int
    objective: _containers.RepeatedScalarFieldContainer[float]
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    result: JobResult
    error: JobError
    attempts: int
    last_seq: int
    queue_position: int
    objective_text: str
    worker: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., request_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., step: _Optional[int] = ..., steps: _Optional[int] = ..., objective: _Optional[_Iterable[float]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., result: _Optional[_Union[JobResult, _Mapping]] = ..., error: _Optional[_Union[JobError, _Mapping]] = ..., attempts: _Optional[int] = ..., last_seq: _Optional[int] = ..., queue_position: _Optional[int] = ..., objective_text: _Optional[str] = ..., worker: _Optional[str] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("spec", "request_id")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    request_id: str
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class CreateAndWatchJobRequest(_message.Message):
    __slots__ = ("spec", "request_id", "include_previews")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PREVIEWS_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    request_id: str
    include_previews: bool
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ..., request_id: _Optional[str] = ..., include_previews: _Optional[bool] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job", "from_seq", "include_previews")
    JOB_FIELD_NUMBER: _ClassVar[int]
    FROM_SEQ_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PREVIEWS_FIELD_NUMBER: _ClassVar[int]
    job: str
    from_seq: int
    include_previews: bool
    def __init__(self, job: _Optional[str] = ..., from_seq: _Optional[int] = ..., include_previews: _Optional[bool] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "steps", "objective", "seconds_per_step")
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    steps: int
    objective: _containers.RepeatedScalarFieldContainer[float]
    seconds_per_step: float
    def __init__(self, step: _Optional[int] = ..., steps: _Optional[int] = ..., objective: _Optional[_Iterable[float]] = ..., seconds_per_step: _Optional[float] = ...) -> None: ...

class Preview(_message.Message):
    __slots__ = ("step", "images")
    STEP_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    step: int
    images: _containers.RepeatedCompositeFieldContainer[RenderedImage]
    def __init__(self, step: _Optional[int] = ..., images: _Optional[_Iterable[_Union[RenderedImage, _Mapping]]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("seq", "time", "snapshot", "state", "progress", "preview", "heartbeat", "result")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time: _timestamp_pb2.Timestamp
    snapshot: Job
    state: JobState
    progress: Progress
    preview: Preview
    heartbeat: Heartbeat
    result: Job
    def __init__(self, seq: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., snapshot: _Optional[_Union[Job, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., preview: _Optional[_Union[Preview, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., result: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "state")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    state: JobState
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_upload_bytes", "max_chunk_bytes", "max_image_side", "max_steps", "max_batch", "max_queued_jobs_per_tenant", "max_message_bytes", "max_objective_nodes", "max_objective_depth", "max_partial_upload_bytes", "partial_upload_ttl_seconds", "upload_idle_timeout_seconds", "min_image_side", "max_model_nodes", "max_activation_bytes", "max_image_steps_per_tenant", "time_slice_steps", "max_models_per_tenant", "max_model_bytes_per_tenant", "max_watches_per_tenant", "min_lr", "max_lr", "max_failed_auth_per_minute", "max_concurrent_uploads_per_tenant", "http_header_timeout_seconds", "max_http_connections_per_client", "http_body_idle_timeout_seconds", "session_ttl_seconds", "max_job_memory_bytes", "max_reply_bytes", "max_page_size", "default_page_size", "import_timeout_seconds", "import_memory_bytes", "max_model_name_chars", "max_images_per_job", "max_dataset_images", "max_dataset_bytes", "max_dataset_image_side", "max_dataset_image_bytes", "max_archive_members", "max_compression_ratio", "max_datasets_per_tenant", "max_exemplar_k", "max_index_batch", "max_indexes_per_tenant", "max_atlas_units", "max_atlases_per_tenant", "min_prior_images", "max_latent_size", "max_match_k", "max_atlas_diversity")
    MAX_UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_JOBS_PER_TENANT_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_OBJECTIVE_NODES_FIELD_NUMBER: _ClassVar[int]
    MAX_OBJECTIVE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    MAX_PARTIAL_UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_UPLOAD_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_IDLE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MIN_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_NODES_FIELD_NUMBER: _ClassVar[int]
    MAX_ACTIVATION_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_STEPS_PER_TENANT_FIELD_NUMBER: _ClassVar[int]
    TIME_SLICE_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODELS_PER_TENANT_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_BYTES_PER_TENANT_FIELD_NUMBER: _ClassVar[int]
    MAX_WATCHES_PER_TENANT_FIELD_NUMBER: _ClassVar[int]
    MIN_LR_FIELD_NUMBER: _ClassVar[int]
    MAX_LR_FIELD_NUMBER: _ClassVar[int]
    MAX_FAILED_AUTH_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_UPLOADS_PER_TENANT_FIELD_NUMBER: _ClassVar[int]
    HTTP_HEADER_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_HTTP_CONNECTIONS_PER_CLIENT_FIELD_NUMBER: _ClassVar[int]
    HTTP_BODY_IDLE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SESSION_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_JOB_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    IMPORT_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IMPORT_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_NAME_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_JOB_FIELD_NUMBER: _ClassVar[int]
    MAX_DATASET_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_DATASET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_DATASET_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_DATASET_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_ARCHIVE_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    MAX_COMPRESSION_RATIO_FIELD_NUMBER: _ClassVar[int]
    MAX_DATASETS_PER_TENANT_FIELD_NUMBER: _ClassVar[int]
    MAX_EXEMPLAR_K_FIELD_NUMBER: _ClassVar[int]
    MAX_INDEX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_INDEXES_PER_TENANT_FIELD_NUMBER: _ClassVar[int]
    MAX_ATLAS_UNITS_FIELD_NUMBER: _ClassVar[int]
    MAX_ATLASES_PER_TENANT_FIELD_NUMBER: _ClassVar[int]
    MIN_PRIOR_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_LATENT_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MATCH_K_FIELD_NUMBER: _ClassVar[int]
    MAX_ATLAS_DIVERSITY_FIELD_NUMBER: _ClassVar[int]
    max_upload_bytes: int
    max_chunk_bytes: int
    max_image_side: int
    max_steps: int
    max_batch: int
    max_queued_jobs_per_tenant: int
    max_message_bytes: int
    max_objective_nodes: int
    max_objective_depth: int
    max_partial_upload_bytes: int
    partial_upload_ttl_seconds: int
    upload_idle_timeout_seconds: float
    min_image_side: int
    max_model_nodes: int
    max_activation_bytes: int
    max_image_steps_per_tenant: int
    time_slice_steps: int
    max_models_per_tenant: int
    max_model_bytes_per_tenant: int
    max_watches_per_tenant: int
    min_lr: float
    max_lr: float
    max_failed_auth_per_minute: int
    max_concurrent_uploads_per_tenant: int
    http_header_timeout_seconds: float
    max_http_connections_per_client: int
    http_body_idle_timeout_seconds: float
    session_ttl_seconds: int
    max_job_memory_bytes: int
    max_reply_bytes: int
    max_page_size: int
    default_page_size: int
    import_timeout_seconds: float
    import_memory_bytes: int
    max_model_name_chars: int
    max_images_per_job: int
    max_dataset_images: int
    max_dataset_bytes: int
    max_dataset_image_side: int
    max_dataset_image_bytes: int
    max_archive_members: int
    max_compression_ratio: int
    max_datasets_per_tenant: int
    max_exemplar_k: int
    max_index_batch: int
    max_indexes_per_tenant: int
    max_atlas_units: int
    max_atlases_per_tenant: int
    min_prior_images: int
    max_latent_size: int
    max_match_k: int
    max_atlas_diversity: int
    def __init__(self, max_upload_bytes: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., max_image_side: _Optional[int] = ..., max_steps: _Optional[int] = ..., max_batch: _Optional[int] = ..., max_queued_jobs_per_tenant: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_objective_nodes: _Optional[int] = ..., max_objective_depth: _Optional[int] = ..., max_partial_upload_bytes: _Optional[int] = ..., partial_upload_ttl_seconds: _Optional[int] = ..., upload_idle_timeout_seconds: _Optional[float] = ..., min_image_side: _Optional[int] = ..., max_model_nodes: _Optional[int] = ..., max_activation_bytes: _Optional[int] = ..., max_image_steps_per_tenant: _Optional[int] = ..., time_slice_steps: _Optional[int] = ..., max_models_per_tenant: _Optional[int] = ..., max_model_bytes_per_tenant: _Optional[int] = ..., max_watches_per_tenant: _Optional[int] = ..., min_lr: _Optional[float] = ..., max_lr: _Optional[float] = ..., max_failed_auth_per_minute: _Optional[int] = ..., max_concurrent_uploads_per_tenant: _Optional[int] = ..., http_header_timeout_seconds: _Optional[float] = ..., max_http_connections_per_client: _Optional[int] = ..., http_body_idle_timeout_seconds: _Optional[float] = ..., session_ttl_seconds: _Optional[int] = ..., max_job_memory_bytes: _Optional[int] = ..., max_reply_bytes: _Optional[int] = ..., max_page_size: _Optional[int] = ..., default_page_size: _Optional[int] = ..., import_timeout_seconds: _Optional[float] = ..., import_memory_bytes: _Optional[int] = ..., max_model_name_chars: _Optional[int] = ..., max_images_per_job: _Optional[int] = ..., max_dataset_images: _Optional[int] = ..., max_dataset_bytes: _Optional[int] = ..., max_dataset_image_side: _Optional[int] = ..., max_dataset_image_bytes: _Optional[int] = ..., max_archive_members: _Optional[int] = ..., max_compression_ratio: _Optional[int] = ..., max_datasets_per_tenant: _Optional[int] = ..., max_exemplar_k: _Optional[int] = ..., max_index_batch: _Optional[int] = ..., max_indexes_per_tenant: _Optional[int] = ..., max_atlas_units: _Optional[int] = ..., max_atlases_per_tenant: _Optional[int] = ..., min_prior_images: _Optional[int] = ..., max_latent_size: _Optional[int] = ..., max_match_k: _Optional[int] = ..., max_atlas_diversity: _Optional[int] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("kind", "name", "memory_bytes", "kernels")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    KERNELS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    memory_bytes: int
    kernels: str
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., kernels: _Optional[str] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("device", "models", "active_slots", "active_images", "max_batch", "memory_allocated_bytes", "id", "node", "pid", "up", "parked_slots", "max_step_images")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MEMORY_ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    PARKED_SLOTS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_IMAGES_FIELD_NUMBER: _ClassVar[int]
    device: Device
    models: _containers.RepeatedScalarFieldContainer[str]
    active_slots: int
    active_images: int
    max_batch: int
    memory_allocated_bytes: int
    id: str
    node: str
    pid: int
    up: bool
    parked_slots: int
    max_step_images: int
    def __init__(self, device: _Optional[_Union[Device, _Mapping]] = ..., models: _Optional[_Iterable[str]] = ..., active_slots: _Optional[int] = ..., active_images: _Optional[int] = ..., max_batch: _Optional[int] = ..., memory_allocated_bytes: _Optional[int] = ..., id: _Optional[str] = ..., node: _Optional[str] = ..., pid: _Optional[int] = ..., up: _Optional[bool] = ..., parked_slots: _Optional[int] = ..., max_step_images: _Optional[int] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "api_version", "limits", "device", "auth_required", "tenant", "objective_kinds", "max_batch", "worker", "progress_interval_seconds", "workers", "job_options", "max_step_images", "max_progress_rate")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    AUTH_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_KINDS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    JOB_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_PROGRESS_RATE_FIELD_NUMBER: _ClassVar[int]
    version: str
    api_version: str
    limits: Limits
    device: Device
    auth_required: bool
    tenant: str
    objective_kinds: _containers.RepeatedScalarFieldContainer[str]
    max_batch: int
    worker: WorkerInfo
    progress_interval_seconds: float
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    job_options: _containers.RepeatedCompositeFieldContainer[JobOption]
    max_step_images: int
    max_progress_rate: float
    def __init__(self, version: _Optional[str] = ..., api_version: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., device: _Optional[_Union[Device, _Mapping]] = ..., auth_required: _Optional[bool] = ..., tenant: _Optional[str] = ..., objective_kinds: _Optional[_Iterable[str]] = ..., max_batch: _Optional[int] = ..., worker: _Optional[_Union[WorkerInfo, _Mapping]] = ..., progress_interval_seconds: _Optional[float] = ..., workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., job_options: _Optional[_Iterable[_Union[JobOption, _Mapping]]] = ..., max_step_images: _Optional[int] = ..., max_progress_rate: _Optional[float] = ...) -> None: ...

class JobOption(_message.Message):
    __slots__ = ("name", "type", "default", "choices", "minimum", "maximum", "below", "min_limit", "max_limit", "help", "flag", "surfaces", "engine", "kinds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    MINIMUM_FIELD_NUMBER: _ClassVar[int]
    MAXIMUM_FIELD_NUMBER: _ClassVar[int]
    BELOW_FIELD_NUMBER: _ClassVar[int]
    MIN_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MAX_LIMIT_FIELD_NUMBER: _ClassVar[int]
    HELP_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    SURFACES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    default: str
    choices: _containers.RepeatedScalarFieldContainer[str]
    minimum: float
    maximum: float
    below: float
    min_limit: str
    max_limit: str
    help: str
    flag: str
    surfaces: _containers.RepeatedScalarFieldContainer[str]
    engine: bool
    kinds: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., default: _Optional[str] = ..., choices: _Optional[_Iterable[str]] = ..., minimum: _Optional[float] = ..., maximum: _Optional[float] = ..., below: _Optional[float] = ..., min_limit: _Optional[str] = ..., max_limit: _Optional[str] = ..., help: _Optional[str] = ..., flag: _Optional[str] = ..., surfaces: _Optional[_Iterable[str]] = ..., engine: _Optional[bool] = ..., kinds: _Optional[_Iterable[str]] = ...) -> None: ...
