"""nitro-cli's error codes and the one exception type users see.

docs/nitro-cli.md: every failure is an ``Exx`` code whose number is the process exit status.
The names and numbering follow nitro-cli's ``NitroCliErrorEnum`` (E00-E60); keep them, even
those the harness never raises, so scripts written against nitro-cli read our exit statuses the
same way. The one exception is E00 (UnspecifiedError): its number is 0, and nitro-cli exits
with the number, so an unspecified failure there reads as success; the harness exits with
:data:`UNSPECIFIED_EXIT_STATUS` instead.
"""

from __future__ import annotations

import enum

#: Exit status of E00 UnspecifiedError (an unexpected failure). Not 0, which reads as success,
#: and none of 1..60, which scripts read as E01..E60: 101 is what nitro-cli itself exits with
#: when it fails outside its error enum (a Rust panic).
UNSPECIFIED_EXIT_STATUS = 101


class ErrorCode(enum.IntEnum):
    """nitro-cli error numbers (``E<nn>``); the value is the exit status (see
    :attr:`exit_status` for E00)."""

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

    @property
    def exit_status(self) -> int:
        """The process exit status for this code: its number, except E00, which exits
        :data:`UNSPECIFIED_EXIT_STATUS` (never 0: a failure must not read as success)."""
        return self.value or UNSPECIFIED_EXIT_STATUS


class NitroError(Exception):
    """A failure reported to the user as one line: ``[ Exx ] message``.

    ``code`` is an :class:`ErrorCode` (its :attr:`~ErrorCode.exit_status` is the CLI's exit
    status); ``message`` names the file, field and rule that failed. ``details`` optionally
    carries extra lines (for example the last console lines of an enclave that never sent its
    heartbeat) that the CLI prints after the one-line summary.
    """

    def __init__(self, code: ErrorCode, message: str, details: str | None = None):
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return f"[ {self.code.tag} ] {self.code.name}: {self.message}"
