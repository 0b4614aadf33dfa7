"""A licensed Python program: checks out a license of a component, holds it while the SDK
heartbeats in the background, and checks it in (the `with` block).

    pip install ./bindings/python
    python examples/python/hold.py VENDOR_PUBLIC_KEY http://127.0.0.1:7400 cad

The vendor's public key is an argument here so the example runs against any vendor; a real
application has it as a constant in its code. Commands on standard input: "status" prints
whether the lease is held, "checkin" returns it and exits. Output lines: "LEASE <id>",
"EVENT <reconnecting|reconnected|lost> <message>" (from the SDK's heartbeat thread),
"STATUS held" or "STATUS lost <why>", "CHECKIN ok", or "REFUSED <code> <message>" (exit 2).
"""

import sys

import tessera


def on_event(kind: str, message: str) -> None:
    # Called on the SDK's thread: note the event; a real application would save its work
    # when the lease is lost.
    print(f"EVENT {kind} {message}", flush=True)


def main() -> int:
    vendor_public_key, servers, component = sys.argv[1:4]
    client = tessera.Client(vendor_public_key=vendor_public_key, servers=servers.split(","))
    try:
        lease = client.checkout(component, on_event=on_event)
    except tessera.TesseraError as refused:
        print(f"REFUSED {refused.code} {refused.message}", flush=True)
        return 2
    with lease:
        print(f"LEASE {lease.lease_id}", flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "status":
                print("STATUS held" if lease.lost is None else f"STATUS lost {lease.lost}", flush=True)
            elif command == "checkin":
                break
    print("CHECKIN ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
