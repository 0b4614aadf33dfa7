"""Type hints of the `tessera` module (the Tessera SDK for Python)."""

from types import TracebackType
from typing import Optional, Sequence, Type, Union

class TesseraError(Exception):
    """A refusal: `code` is the server's stable code (``no_licenses_available``,
    ``component_not_licensed``, ``lease_held``, …) or ``lease_untrusted`` when the lease does
    not check out against the vendor's key; `message` says why."""

    code: str
    message: str

class Lease:
    """A license held; heartbeated in the background until checked in. A context manager:
    leaving the ``with`` block checks it in."""

    lease_id: str
    component: str
    key_id: str
    expires_at: str
    @property
    def lost(self) -> Optional[str]:
        """Why the lease was lost (the server no longer knows it), or None while held."""
    def checkin(self) -> None: ...
    def __enter__(self) -> "Lease": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...

class Client:
    """Checks out licenses from Tessera license servers, accepting only leases that check
    out against `vendor_public_key` (base64, compiled into the application).

    `servers`: URLs of one server or of a domain's hosts; None reads TESSERA_SERVER."""

    def __init__(
        self,
        vendor_public_key: str,
        servers: Union[Sequence[str], str, None] = None,
    ) -> None: ...
    def checkout(self, component: str, wait: bool = False) -> Lease: ...
