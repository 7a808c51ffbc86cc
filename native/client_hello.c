/*
 * ClientHello scan for the relay's own routing: a port of client-hello.ts's `scan` and
 * `parseBody` that keeps their order of checks, so "complete hello, this SNI" here means JS would
 * say the same (test/native-client-hello.test.ts compares the two on mutated hellos).
 */
#include "client_hello.h"

#include <stdlib.h>
#include <string.h>

#define RECORD_HEADER 5
#define CONTENT_HANDSHAKE 22
#define CLIENT_HELLO 1
#define MAX_FRAGMENT 16384

#define EXT_SERVER_NAME 0
#define EXT_ALPN 16
#define EXT_SUPPORTED_VERSIONS 43
#define EXT_ECH 0xfe0d

static unsigned be16(const uint8_t *p) {
  return (unsigned)p[0] << 8 | p[1];
}

/* host_name: LDH plus '_', no empty label, 1-253 bytes after one trailing dot is dropped. */
static bool host_name(const uint8_t *b, size_t s, size_t e, struct hello_info *out) {
  if (e > s && b[e - 1] == '.') e--;
  size_t n = e - s;
  if (n < 1 || n > 253) return false;
  bool prev_dot = true;
  for (size_t i = 0; i < n; i++) {
    uint8_t ch = b[s + i];
    if (ch == '.') {
      if (prev_dot) return false;
      prev_dot = true;
      out->sni[i] = '.';
      continue;
    }
    prev_dot = false;
    if ((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '-' || ch == '_') out->sni[i] = (char)ch;
    else if (ch >= 'A' && ch <= 'Z') out->sni[i] = (char)(ch + 32);
    else return false;
  }
  if (prev_dot) return false; /* an empty last label ("a.example.com..") */
  out->sni[n] = '\0';
  out->sni_len = (int)n;
  return true;
}

static bool server_name(const uint8_t *b, size_t s, size_t e, struct hello_info *out) {
  if (e - s < 2) return false;
  if (s + 2 + be16(b + s) != e) return false;
  bool named = false;
  for (size_t p = s + 2; p < e;) {
    if (p + 3 > e) return false;
    unsigned type = b[p];
    size_t ns = p + 3, ne = ns + be16(b + p + 1);
    if (ne > e) return false;
    if (type == 0) {
      if (named || !host_name(b, ns, ne, out)) return false;
      named = true;
    }
    p = ne;
  }
  return true;
}

static bool alpn_list(const uint8_t *b, size_t s, size_t e, struct hello_info *out) {
  if (e - s < 2) return false;
  size_t list = be16(b + s);
  if (list < 2 || s + 2 + list != e) return false;
  for (size_t p = s + 2; p < e;) {
    size_t n = b[p];
    if (n == 0 || p + 1 + n > e) return false;
    p += 1 + n;
  }
  if (list > HELLO_ALPN_MAX) return false; /* valid, but longer than kept: JS judges it */
  memcpy(out->alpn, b + s + 2, list);
  out->alpn_len = list;
  return true;
}

/* The hello body b[p, end): HELLO_TLS with the fields filled, or HELLO_OTHER (malformed). */
static enum hello_kind parse_body(const uint8_t *b, size_t p, size_t end, struct hello_info *out) {
  out->sni_len = -1;
  out->ech = false;
  out->alpn_len = 0;
  if (end - p < 2 + 32 + 1) return HELLO_OTHER;
  p += 34;
  unsigned sid = b[p];
  if (sid > 32) return HELLO_OTHER;
  p += 1 + sid;
  if (p + 2 > end) return HELLO_OTHER;
  unsigned cs = be16(b + p);
  if (cs < 2 || (cs & 1)) return HELLO_OTHER;
  p += 2 + cs;
  if (p + 1 > end) return HELLO_OTHER;
  unsigned cm = b[p];
  if (cm < 1) return HELLO_OTHER;
  p += 1 + cm;
  if (p > end) return HELLO_OTHER;
  if (p == end) return HELLO_TLS;
  if (p + 2 > end) return HELLO_OTHER;
  size_t ext = be16(b + p);
  p += 2;
  if (p + ext != end) return HELLO_OTHER;
  bool seen_sni = false, seen_alpn = false, seen_versions = false;
  while (p < end) {
    if (p + 4 > end) return HELLO_OTHER;
    unsigned type = be16(b + p);
    size_t s = p + 4, e = s + be16(b + p + 2);
    if (e > end) return HELLO_OTHER;
    switch (type) {
      case EXT_SERVER_NAME:
        if (seen_sni || !server_name(b, s, e, out)) return HELLO_OTHER;
        seen_sni = true;
        break;
      case EXT_ALPN:
        if (seen_alpn || !alpn_list(b, s, e, out)) return HELLO_OTHER;
        seen_alpn = true;
        break;
      case EXT_SUPPORTED_VERSIONS: {
        if (seen_versions || e - s < 1) return HELLO_OTHER;
        seen_versions = true;
        unsigned vl = b[s];
        if (vl + 1 != e - s || vl < 2 || (vl & 1)) return HELLO_OTHER;
        break;
      }
      case EXT_ECH:
        if (out->ech) return HELLO_OTHER;
        out->ech = true;
        break;
      default:
        break;
    }
    p = e;
  }
  return HELLO_TLS;
}

/* The hello's bytes copied out of consecutive records (framing already checked by the scan). */
static uint8_t *reassemble(const uint8_t *buf, size_t hello_len) {
  uint8_t *out = malloc(hello_len);
  if (!out) return NULL;
  size_t off = 0, n = 0;
  while (n < hello_len) {
    size_t rlen = be16(buf + off + 3);
    size_t take = rlen < hello_len - n ? rlen : hello_len - n;
    memcpy(out + n, buf + off + RECORD_HEADER, take);
    n += take;
    off += RECORD_HEADER + rlen;
  }
  return out;
}

enum hello_kind hello_scan(const uint8_t *buf, size_t len, size_t max_bytes, struct hello_cursor *c, struct hello_info *out) {
  if (len == 0) return HELLO_NEED_MORE;
  if (c->records == 0) {
    if (buf[0] != CONTENT_HANDSHAKE) return HELLO_OTHER;
    if (len >= 2 && buf[1] != 3) return HELLO_OTHER;
  }
  for (;;) {
    size_t off = c->off;
    if (off + RECORD_HEADER > len) {
      if (c->records > 0) {
        if (off < len && buf[off] != CONTENT_HANDSHAKE) return HELLO_OTHER;
        if (off + 1 < len && buf[off + 1] != 3) return HELLO_OTHER;
      }
      return HELLO_NEED_MORE;
    }
    if (c->records > 0 && (buf[off] != CONTENT_HANDSHAKE || buf[off + 1] != 3)) return HELLO_OTHER;
    size_t rlen = be16(buf + off + 3);
    if (rlen == 0 || rlen > MAX_FRAGMENT) return HELLO_OTHER;
    uint32_t record_no = c->records + 1;
    size_t frag = off + RECORD_HEADER;
    size_t avail = len - frag < rlen ? len - frag : rlen;
    uint32_t got = c->got, header = c->header;
    size_t i = 0;
    while (got < 4 && i < avail) {
      header = header << 8 | buf[frag + i];
      got++;
      i++;
      if (got == 1 && header != CLIENT_HELLO) return HELLO_OTHER;
    }
    if (got < 4) {
      if (avail < rlen) return HELLO_NEED_MORE;
      c->off = frag + rlen;
      c->records = record_no;
      c->got = got;
      c->header = header;
      continue;
    }
    size_t hello_len = 4 + (header & 0xffffff);
    if (hello_len + (size_t)RECORD_HEADER * (record_no - 1) > max_bytes) return HELLO_OTHER; /* too large */
    size_t remaining = hello_len - got;
    size_t in_this = rlen - i;
    if (remaining <= in_this) {
      if (avail - i < remaining) return HELLO_NEED_MORE;
      if (record_no == 1) return parse_body(buf, frag + 4, frag + hello_len, out);
      uint8_t *whole = reassemble(buf, hello_len);
      if (!whole) return HELLO_OTHER;
      enum hello_kind k = parse_body(whole, 4, hello_len, out);
      free(whole);
      return k;
    }
    if (avail < rlen) return HELLO_NEED_MORE;
    c->off = frag + rlen;
    c->records = record_no;
    c->got = got + (uint32_t)in_this;
    c->header = header;
  }
}
