/* A licensed C program: checks out a license of a component, holds it while the SDK
 * heartbeats in the background (reporting lost and regained servers), and checks it in.
 *
 *   cc examples/c/hold.c -I include -L target/release -ltessera -o hold
 *   ./hold VENDOR_PUBLIC_KEY http://127.0.0.1:7400 cad
 *
 * The vendor's public key is an argument here so the example can be run against any
 * vendor; a real application compiles it in (never reads it from the customer's files).
 * Commands on standard input: "status" prints whether the lease is held, "checkin" returns
 * it and exits. Output lines: "LEASE <id>", "EVENT <n> <message>", "STATUS <n>",
 * "CHECKIN <n>", or "REFUSED <n> <message>" (exit 2) when the checkout is refused. */
#include <stdio.h>
#include <string.h>

#include "tessera.h"

static void on_event(TesseraEvent event, const char *lease_id, const char *message,
                     void *user_data) {
    (void)lease_id;
    (void)user_data;
    printf("EVENT %d %s\n", (int)event, message);
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s VENDOR_PUBLIC_KEY SERVERS COMPONENT\n", argv[0]);
        return 64;
    }
    TesseraContext *context = tessera_init(argv[1], argv[2]);
    if (context == NULL) {
        fprintf(stderr, "tessera_init: %s\n", tessera_init_error());
        return 1;
    }
    tessera_set_callback(context, on_event, NULL);
    TesseraLease *lease = NULL;
    TesseraStatus status = tessera_checkout(context, argv[3], 0, &lease);
    if (status != TESSERA_STATUS_OK) {
        printf("REFUSED %d %s\n", (int)status, tessera_last_error(context));
        fflush(stdout);
        tessera_free(context);
        return 2;
    }
    printf("LEASE %s\n", tessera_lease_id(lease));
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin) != NULL) {
        if (strncmp(line, "status", 6) == 0) {
            printf("STATUS %d\n", (int)tessera_lease_status(context, lease));
        } else if (strncmp(line, "checkin", 7) == 0) {
            break;
        }
        fflush(stdout);
    }
    status = tessera_checkin(context, lease);
    printf("CHECKIN %d %s\n", (int)status, status == TESSERA_STATUS_OK ? "" : tessera_last_error(context));
    fflush(stdout);
    tessera_free(context);
    return status == TESSERA_STATUS_OK ? 0 : 1;
}
