"""nitro-cli's error codes and the one exception type users see.

SPEC 9: every failure is an ``Exx`` code whose number is the process exit status. The names and
numbering follow nitro-cli's ``NitroCliErrorEnum`` (E00-E60); keep them, even those the harness
never raises, so scripts written against nitro-cli read our exit statuses the same way.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """nitro-cli error numbers (``E<nn>``); the value is the exit status."""

    UnspecifiedError = 0
    MissingArgument = 1
    ConflictingArgument = 2
    InvalidArgument = 3
    SocketPairCreationFailure = 4
    ProcessSpawnFailure = 5
    DaemonizeProcessFailure = 6
    ReadFromDiskFailure = 7
    UnusableConnectionError = 8
    SocketCloseError = 9
    SocketConnectTimeoutError = 10
    SocketError = 11
    EpollError = 12
    InotifyError = 13
    InvalidCommand = 14
    LockAcquireFailure = 15
    ThreadJoinFailure = 16
    SerdeError = 17
    FilePermissionsError = 18
    FileOperationFailure = 19
    InvalidCpuConfiguration = 20
    NoSuchCpuAvailableInPool = 21
    InsufficientCpus = 22
    MalformedCpuId = 23
    CpuError = 24
    NoSuchHugepageFlag = 25
    InsufficientMemoryRequested = 26
    InsufficientMemoryAvailable = 27
    InvalidEnclaveFd = 28
    IoctlFailure = 29
    IoctlImageLoadInfoFailure = 30
    IoctlSetMemoryRegionFailure = 31
    IoctlAddVcpuFailure = 32
    IoctlEnclaveStartFailure = 33
    MemoryOverflow = 34
    EifParsingError = 35
    EnclaveBootFailure = 36
    EnclaveEventWaitError = 37
    EnclaveProcessCommandNotExecuted = 38
    EnclaveProcessConnectionFailure = 39
    SocketPathNotFound = 40
    EnclaveProcessSendReplyFailure = 41
    EnclaveMmapError = 42
    EnclaveMunmapError = 43
    EnclaveConsoleConnectionFailure = 44
    EnclaveConsoleReadError = 45
    EnclaveConsoleWriteOutputError = 46
    IntegerParsingError = 47
    EifBuildingError = 48
    DockerImageBuildError = 49
    DockerImagePullError = 50
    ArtifactsPathNotSet = 51
    BlobsPathNotSet = 52
    ClockSkewError = 53
    SignalMaskingError = 54
    SignalUnmaskingError = 55
    LoggerError = 56
    HasherError = 57
    EnclaveNamingError = 58
    EIFSignatureCheckerError = 59
    EIFSigningError = 60

    @property
    def tag(self) -> str:
        """The code as nitro-cli prints it, e.g. ``"E36"``."""
        return f"E{self.value:02d}"


class NitroError(Exception):
    """A failure reported to the user as one line: ``[ Exx ] message``.

    ``code`` is an :class:`ErrorCode` (its value is the CLI's exit status); ``message`` names
    the file, field and rule that failed. ``details`` optionally carries extra lines (for
    example the last console lines of an enclave that never sent its heartbeat) that the CLI
    prints after the one-line summary.
    """

    def __init__(self, code: ErrorCode, message: str, details: str | None = None):
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return f"[ {self.code.tag} ] {self.code.name}: {self.message}"
