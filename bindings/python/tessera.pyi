"""Type hints of the `tessera` module (the Tessera SDK for Python)."""

from types import TracebackType
from typing import Callable, Optional, Sequence, Type, Union

class TesseraError(Exception):
    """A refusal: `code` is the server's stable code (``no_licenses_available``,
    ``component_not_licensed``, ``lease_held``, …) or ``lease_untrusted`` when the lease does
    not check out against the vendor's key; `message` says why."""

    code: str
    message: str

class Lease:
    """A license held: heartbeated in the background until checked in, or a borrowing
    (``borrowed``), held offline until its end. A context manager: leaving the ``with``
    block checks a lease in (a borrowing is kept; ``checkin()`` returns it early)."""

    lease_id: str
    component: str
    key_id: str
    borrowed: bool
    @property
    def expires_at(self) -> Optional[str]:
        """When the lease ends unless renewed (a borrowing: its end), RFC 3339."""
    @property
    def lost(self) -> Optional[str]:
        """Why the license was lost (or the borrowing ended), or None while held."""
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

    `servers`: URLs of one server or of a domain's hosts; None reads TESSERA_SERVER.
    `borrow_dir`: where borrowings are kept (default: $TESSERA_BORROW_DIR, else
    ~/.local/state/tessera/borrowed)."""

    def __init__(
        self,
        vendor_public_key: str,
        servers: Union[Sequence[str], str, None] = None,
        borrow_dir: Optional[str] = None,
    ) -> None: ...
    def checkout(
        self,
        component: str,
        wait: bool = False,
        on_event: Optional[Callable[[str, str], None]] = None,
    ) -> Lease:
        """A license of `component`: a borrowing kept here while it holds, else a lease from
        the servers. `on_event(kind, message)` hears "reconnecting", "reconnected" and
        "lost" from the SDK's heartbeat thread."""
    def borrow(self, component: str, hours: int) -> Lease:
        """Borrows a license for `hours` (up to the key's max_borrow_days) and keeps it on
        this machine, so `checkout(component)` answers with it offline until it ends."""
