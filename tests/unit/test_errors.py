"""The exception tree and the mapping from wire error codes to exceptions."""

from __future__ import annotations

import importlib
import pickle
import pkgutil
import re

import pytest

import meshkit
from meshkit import errors
from meshkit.errors import (
    BadArgumentsError,
    BadRequestError,
    CallError,
    CallTimeoutError,
    ClientClosedError,
    ConfigError,
    HandlerError,
    LostPeerError,
    MeshError,
    MessageTooLargeError,
    NoInstanceError,
    ProtocolError,
    RefusedError,
    RegistryUnreachableError,
    RemoteError,
    ResourceExhaustedError,
    UnknownConnectionError,
    UnknownMethodError,
    UnknownServiceError,
    UnsupportedVersionError,
    error_from_wire,
)

CALL_ERRORS: list[type[CallError]] = [
    NoInstanceError,
    CallTimeoutError,
    LostPeerError,
    MessageTooLargeError,
    RemoteError,
    UnknownServiceError,
    UnknownMethodError,
    BadArgumentsError,
    BadRequestError,
    UnsupportedVersionError,
    HandlerError,
    RefusedError,
    UnknownConnectionError,
    ResourceExhaustedError,
]

# The tree drawn in the errors module's docstring: class -> parent.
TREE: dict[type[Exception], type[Exception]] = {
    MeshError: Exception,
    ConfigError: MeshError,
    ClientClosedError: MeshError,
    RegistryUnreachableError: MeshError,
    ProtocolError: MeshError,
    CallError: MeshError,
    NoInstanceError: CallError,
    CallTimeoutError: CallError,
    LostPeerError: CallError,
    MessageTooLargeError: CallError,
    RemoteError: CallError,
    UnknownServiceError: RemoteError,
    UnknownMethodError: RemoteError,
    BadArgumentsError: RemoteError,
    BadRequestError: RemoteError,
    UnsupportedVersionError: RemoteError,
    HandlerError: RemoteError,
    RefusedError: RemoteError,
    UnknownConnectionError: RefusedError,
    ResourceExhaustedError: RefusedError,
}

CODES = {
    NoInstanceError: "no_instance",
    CallTimeoutError: "timeout",
    LostPeerError: "lost_peer",
    MessageTooLargeError: "too_large",
    RemoteError: "remote_error",
    UnknownServiceError: "unknown_service",
    UnknownMethodError: "unknown_method",
    BadArgumentsError: "bad_arguments",
    BadRequestError: "bad_request",
    UnsupportedVersionError: "unsupported_version",
    HandlerError: "handler_error",
    RefusedError: "refused",
    UnknownConnectionError: "unknown_connection",
    ResourceExhaustedError: "resource_exhausted",
}


def drawn_tree() -> dict[str, str]:
    """Class name -> parent name, read from the tree drawn in the errors module's docstring."""
    lines = (errors.__doc__ or "").split("::", 1)[1].split("\n\n", 2)[1].splitlines()
    parents: dict[str, str] = {}
    path: list[str] = []
    for line in lines:
        match = re.match(r"\s*((?:[│ ] {3})*)(?:[├└]── )?(\w+)", line)
        assert match is not None, line
        depth = len(match.group(1)) // 4 + (1 if "── " in line else 0)
        del path[depth:]
        parents[match.group(2)] = path[-1] if path else "Exception"
        path.append(match.group(2))
    return parents


def every_mesh_error() -> set[type[MeshError]]:
    """Every subclass of MeshError that the package (and its subpackages) define."""
    for info in pkgutil.walk_packages(meshkit.__path__, "meshkit."):
        if not info.name.endswith("__main__"):  # running it is the CLI
            importlib.import_module(info.name)
    found: set[type[MeshError]] = set()
    todo: list[type[MeshError]] = [MeshError]
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("meshkit") and cls not in found:
            found.add(cls)
            todo.extend(cls.__subclasses__())
    return found


def test_the_drawn_tree_is_every_mesh_error_with_its_parent() -> None:
    drawn = drawn_tree()
    classes = every_mesh_error()
    assert set(drawn) == {cls.__name__ for cls in classes}
    for cls in classes:
        (parent,) = [base for base in cls.__bases__ if issubclass(base, Exception)
                     and (base is Exception or base.__module__.startswith("meshkit"))]
        assert drawn[cls.__name__] == parent.__name__, cls
        assert cls.__doc__, f"{cls.__name__} needs a one-line docstring"


def test_the_tree_of_the_errors_module() -> None:
    for cls, parent in TREE.items():
        assert parent in cls.__bases__, cls
    assert CallTimeoutError.__bases__ == (CallError, TimeoutError)
    assert isinstance(CallTimeoutError("late"), TimeoutError)


def test_rpc_error_of_the_gateway_is_a_mesh_error() -> None:
    from meshkit.gateway.jsonrpc import RpcError
    assert issubclass(RpcError, MeshError)


def test_every_exception_in_the_module_is_in_the_tree() -> None:
    defined = {
        value
        for value in vars(errors).values()
        if isinstance(value, type)
        and issubclass(value, BaseException)
        and value.__module__ == errors.__name__
    }
    assert defined == set(TREE)
    assert all(issubclass(cls, MeshError) for cls in defined)


def test_every_public_exception_is_a_mesh_error() -> None:
    exported = [getattr(meshkit, name) for name in meshkit.__all__]
    exceptions = [o for o in exported if isinstance(o, type) and issubclass(o, BaseException)]
    assert set(exceptions) == set(TREE)


def test_call_error_codes_are_distinct_and_stable() -> None:
    assert {cls: cls.code for cls in CALL_ERRORS} == CODES
    assert len(set(CODES.values())) == len(CODES)
    assert CallError.code == "call_error"


@pytest.mark.parametrize("cls", CALL_ERRORS, ids=lambda c: c.__name__)
def test_error_from_wire_maps_every_code(cls: type[CallError]) -> None:
    exc = error_from_wire(cls.code, "it failed", service="cart", method="add")
    assert type(exc) is cls
    assert exc.message == "it failed"
    assert str(exc) == "it failed"
    assert (exc.service, exc.method) == ("cart", "add")


@pytest.mark.parametrize(
    ("code", "cls"),
    [("deadline_exceeded", CallTimeoutError), ("reply_too_large", MessageTooLargeError)],
)
def test_server_side_codes_the_client_translates(code: str, cls: type[CallError]) -> None:
    exc = error_from_wire(code, "late")
    assert type(exc) is cls
    assert exc.message == "late"


def test_client_handled_code_constants() -> None:
    assert errors.DRAINING == "draining"
    assert errors.DEADLINE_EXCEEDED == "deadline_exceeded"
    assert errors.REPLY_TOO_LARGE == "reply_too_large"


@pytest.mark.parametrize("code", ["quota_exceeded", "draining", "", "call_error"])
def test_unknown_code_becomes_remote_error_keeping_the_code(code: str) -> None:
    exc = error_from_wire(code, "slow down", service="s", method="m")
    assert type(exc) is RemoteError
    assert str(exc) == f"[{code}] slow down"
    assert (exc.service, exc.method) == ("s", "m")


def test_handler_error_fields() -> None:
    exc = error_from_wire(
        "handler_error", "boom", service="s", method="m",
        remote_type="ValueError", remote_traceback="Traceback ...",
    )
    assert isinstance(exc, HandlerError)
    assert exc.remote_type == "ValueError"
    assert exc.remote_traceback == "Traceback ..."
    assert exc.message == "boom"
    assert str(exc) == "ValueError: boom"


def test_handler_error_without_type() -> None:
    exc = HandlerError("boom")
    assert exc.remote_type == ""
    assert exc.remote_traceback is None
    assert str(exc) == "boom"


def test_remote_type_is_ignored_for_other_codes() -> None:
    exc = error_from_wire("bad_arguments", "missing x", remote_type="TypeError")
    assert type(exc) is BadArgumentsError
    assert str(exc) == "missing x"


@pytest.mark.parametrize("cls", CALL_ERRORS, ids=lambda c: c.__name__)
def test_empty_message_defaults_to_the_code(cls: type[CallError]) -> None:
    exc = cls()
    assert exc.message == cls.code
    assert str(exc) == cls.code


@pytest.mark.parametrize("cls", CALL_ERRORS, ids=lambda c: c.__name__)
def test_pickle_round_trip(cls: type[CallError]) -> None:
    exc = cls("went wrong", service="cart", method="add")
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is cls
    assert (copy.message, copy.service, copy.method) == ("went wrong", "cart", "add")
    assert str(copy) == str(exc)


def test_handler_error_pickle_keeps_remote_fields() -> None:
    exc = HandlerError("boom", service="s", method="m",
                       remote_type="ValueError", remote_traceback="tb")
    copy = pickle.loads(pickle.dumps(exc))
    assert (copy.remote_type, copy.remote_traceback) == ("ValueError", "tb")
    assert str(copy) == "ValueError: boom"


def test_protocol_error_fields() -> None:
    exc = ProtocolError("bad_request", "not msgpack", 42)
    assert (exc.code, exc.id, str(exc)) == ("bad_request", 42, "not msgpack")
    assert ProtocolError("bad_request", "x").id == 0


def test_protocol_error_pickle_round_trip() -> None:
    copy = pickle.loads(pickle.dumps(ProtocolError("bad_request", "not msgpack", 42)))
    assert (copy.code, copy.id, str(copy)) == ("bad_request", 42, "not msgpack")


@pytest.mark.parametrize("cls", [ConfigError, ClientClosedError, MeshError])
def test_plain_errors_pickle(cls: type[MeshError]) -> None:
    copy = pickle.loads(pickle.dumps(cls("why")))
    assert type(copy) is cls and str(copy) == "why"


def test_a_refusal_keeps_its_client_code_across_the_wire() -> None:
    sent = RefusedError("Low difficulty share", client_code=23)
    assert sent.wire_message == "[23] Low difficulty share"
    got = error_from_wire("refused", sent.wire_message, service="mining", method="submit")
    assert type(got) is RefusedError
    assert (got.client_code, got.message) == (23, "Low difficulty share")
    plain = error_from_wire("unknown_connection", "no connection abc-1")
    assert type(plain) is UnknownConnectionError and plain.client_code is None
    assert plain.message == "no connection abc-1"
    copy = pickle.loads(pickle.dumps(sent))
    assert (type(copy), copy.client_code, copy.message) == (RefusedError, 23, "Low difficulty share")


class QuotaExceededError(RefusedError):
    """A service's own refusal, sent as its own code."""

    code = "quota_exceeded_test"


def test_a_service_registers_its_own_code_and_gets_its_class_back() -> None:
    assert errors.register_error_code(QuotaExceededError) is QuotaExceededError
    errors.register_error_code(QuotaExceededError)  # again: a no-op
    got = error_from_wire("quota_exceeded_test", "[7] slow down", service="s", method="m")
    assert type(got) is QuotaExceededError
    assert (got.client_code, got.message, got.code) == (7, "slow down", "quota_exceeded_test")


def test_registering_a_bad_or_taken_code_is_refused() -> None:
    class Builtin(RefusedError):
        code = "draining"

    class Taken(RefusedError):
        code = "quota_exceeded_test"

    class Shouting(RefusedError):
        code = "Bad Code"

    class Inherited(RefusedError):
        """Defines no code of its own."""

    errors.register_error_code(QuotaExceededError)
    with pytest.raises(ValueError, match="meshkit's own"):
        errors.register_error_code(Builtin)
    with pytest.raises(ValueError, match="already registered"):
        errors.register_error_code(Taken)
    with pytest.raises(ValueError, match="must match"):
        errors.register_error_code(Shouting)
    with pytest.raises(ValueError, match="must match"):
        errors.register_error_code(Inherited)
    with pytest.raises(TypeError):
        errors.register_error_code(HandlerError)  # type: ignore[arg-type]


def test_codes_are_str_enums_equal_to_their_wire_strings() -> None:
    from meshkit.codes import ErrorCode, InstanceState, LocalCode
    assert ErrorCode.DRAINING == "draining" and f"{ErrorCode.DRAINING}" == "draining"
    assert InstanceState.DRAINING == errors.DRAINING
    assert all(cls.code in set(ErrorCode) | set(LocalCode) for cls in CODES)
