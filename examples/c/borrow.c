/* Borrowing from C: a license taken for some hours, used with no server, returned early.
 *
 *   cc examples/c/borrow.c -I include -L target/release -ltessera -o borrow
 *   ./borrow VENDOR_PUBLIC_KEY http://127.0.0.1:7400 cad borrow 24
 *   ./borrow VENDOR_PUBLIC_KEY http://127.0.0.1:7400 cad use
 *   ./borrow VENDOR_PUBLIC_KEY http://127.0.0.1:7400 cad return
 *
 * "borrow HOURS" borrows (the key must allow it: max_borrow_days) and keeps the borrowing on
 * this machine ($TESSERA_BORROW_DIR, else ~/.local/state/tessera/borrowed); "use" checks out,
 * which answers with the borrowing while it holds, even with every server down; "return"
 * gives it back early. Output lines: "BORROWED <id> <end, Unix seconds>",
 * "LEASE <id> borrowed=<0|1>", "RETURNED <id>", or "REFUSED <status> <message>" (exit 2). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tessera.h"

static int refused(TesseraContext *context, TesseraStatus status) {
    printf("REFUSED %d %s\n", (int)status, tessera_last_error(context));
    tessera_free(context);
    return 2;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s VENDOR_PUBLIC_KEY SERVERS COMPONENT borrow HOURS|use|return\n", argv[0]);
        return 64;
    }
    TesseraContext *context = tessera_init(argv[1], argv[2]);
    if (context == NULL) {
        fprintf(stderr, "tessera_init: %s\n", tessera_init_error());
        return 1;
    }
    const char *component = argv[3];
    const char *action = argv[4];
    TesseraLease *lease = NULL;
    TesseraStatus status;
    if (strcmp(action, "borrow") == 0 && argc == 6) {
        status = tessera_borrow(context, component, (uint32_t)strtoul(argv[5], NULL, 10), &lease);
        if (status != TESSERA_STATUS_OK) return refused(context, status);
        printf("BORROWED %s %lld\n", tessera_lease_id(lease), (long long)tessera_lease_expires_at(lease));
        /* Kept on this machine: freeing the handle does not return it. */
        tessera_lease_free(lease);
    } else if (strcmp(action, "use") == 0) {
        status = tessera_checkout(context, component, 0, &lease);
        if (status != TESSERA_STATUS_OK) return refused(context, status);
        int borrowed = tessera_lease_borrowed(lease);
        printf("LEASE %s borrowed=%d\n", tessera_lease_id(lease), borrowed);
        if (!borrowed) tessera_checkin(context, lease);
        else tessera_lease_free(lease);
    } else if (strcmp(action, "return") == 0) {
        status = tessera_checkout(context, component, 0, &lease);
        if (status != TESSERA_STATUS_OK) return refused(context, status);
        char id[128];
        snprintf(id, sizeof id, "%s", tessera_lease_id(lease));
        status = tessera_checkin(context, lease);
        if (status != TESSERA_STATUS_OK) return refused(context, status);
        printf("RETURNED %s\n", id);
    } else {
        fprintf(stderr, "unknown action %s\n", action);
        tessera_free(context);
        return 64;
    }
    tessera_free(context);
    return 0;
}
