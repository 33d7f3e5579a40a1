from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class IncrementalCheckpoint(_message.Message):
    __slots__ = ("pre_dump", "parent_path")
    PRE_DUMP_FIELD_NUMBER: _ClassVar[int]
    PARENT_PATH_FIELD_NUMBER: _ClassVar[int]
    pre_dump: bool
    parent_path: str
    def __init__(self, pre_dump: bool = ..., parent_path: _Optional[str] = ...) -> None: ...
