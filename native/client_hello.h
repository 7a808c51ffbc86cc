/*
 * The native side of tlsgate's ClientHello reader: the same decision as
 * src/runtime/listener/client-hello.ts (record reassembly, the caps, every malformed check), so
 * the relay can route a connection it accepted without asking JS. Only a complete TLS hello is
 * reported as such; not-TLS, too-large and malformed are all "other", which JS then judges itself.
 */
#ifndef TLSGATE_CLIENT_HELLO_H
#define TLSGATE_CLIENT_HELLO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum hello_kind { HELLO_NEED_MORE = 0, HELLO_TLS, HELLO_OTHER };

/* The longest ALPN list kept (the extension's protocol list, as sent); a longer one is "other". */
#define HELLO_ALPN_MAX 512

struct hello_info {
  /* host_name as client-hello.ts returns it: lower-cased, one trailing dot dropped. */
  char sni[254];
  int sni_len; /* -1: no host_name */
  bool ech;
  /* The ALPN protocol list: length-prefixed names, as in the extension. */
  uint8_t alpn[HELLO_ALPN_MAX];
  size_t alpn_len;
};

/* Where the record walk stopped (only whole records are committed): a buffer that keeps growing
 * is not walked again from its start, so a hello fed one byte at a time stays O(n). */
struct hello_cursor {
  size_t off;      /* the first record not yet fully consumed */
  uint32_t records; /* records fully consumed */
  uint32_t got;     /* hello bytes (handshake header + body) those records carried */
  uint32_t header;  /* the 4-byte handshake header, as far as it has been seen */
};

/* What `buf[0, len)` is so far, for a reader that accepts hellos up to `max_bytes`. Each call
 * passes the accumulated bytes and the same cursor (zeroed before the first); the answer is final
 * once it is not HELLO_NEED_MORE. */
enum hello_kind hello_scan(const uint8_t *buf, size_t len, size_t max_bytes, struct hello_cursor *c, struct hello_info *out);

#endif
