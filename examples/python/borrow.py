"""Borrowing: a license taken for some hours and used with no server, then returned early.

    pip install ./bindings/python
    python examples/python/borrow.py VENDOR_PUBLIC_KEY http://127.0.0.1:7400 cad borrow 24
    python examples/python/borrow.py VENDOR_PUBLIC_KEY http://127.0.0.1:7400 cad use
    python examples/python/borrow.py VENDOR_PUBLIC_KEY http://127.0.0.1:7400 cad return

"borrow HOURS" borrows (the key must allow it: max_borrow_days) and keeps the borrowing on
this machine ($TESSERA_BORROW_DIR, else ~/.local/state/tessera/borrowed); "use" checks out,
which answers with the borrowing while it holds, even with every server down; "return" gives
it back early. Output lines: "BORROWED <id> <end>", "LEASE <id> borrowed=<True|False>",
"RETURNED <id>", or "REFUSED <code> <message>" (exit 2).
"""

import sys

import tessera


def main() -> int:
    vendor_public_key, servers, component, action = sys.argv[1:5]
    client = tessera.Client(vendor_public_key=vendor_public_key, servers=servers.split(","))
    try:
        if action == "borrow":
            lease = client.borrow(component, int(sys.argv[5]))
            print(f"BORROWED {lease.lease_id} {lease.expires_at}", flush=True)
        elif action == "use":
            lease = client.checkout(component)
            print(f"LEASE {lease.lease_id} borrowed={lease.borrowed}", flush=True)
            if not lease.borrowed:
                lease.checkin()
        elif action == "return":
            lease = client.checkout(component)
            lease.checkin()
            print(f"RETURNED {lease.lease_id}", flush=True)
        else:
            print(f"unknown action {action!r}", file=sys.stderr)
            return 64
    except tessera.TesseraError as refused:
        print(f"REFUSED {refused.code} {refused.message}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
