/*
 * tlsgate's optional native TCP relay: moves bytes between two connected TCP sockets outside
 * the JS heap. A read goes through one relay-wide buffer (recv, then send) while the other side
 * keeps up; what it does not take waits in the direction's pipe, and reads then splice(2) in
 * behind it until the pipe is full (backpressure). On loopback, measured against always
 * splicing: more throughput for bulk downloads and fewer syscalls per small exchange.
 *
 * One epoll set per Node environment serves every connection JS hands over. It runs on Node's own
 * event loop (a uv_poll on the epoll descriptor, and a timer for deadlines), as nginx runs one
 * loop per worker: no wake-ups, eventfds or locks cross between threads per connection (the
 * relay thread below serves only connections that need no JS). JS hands over a pair of sockets
 * it no longer reads or writes; the addon dup()s both descriptors (a socket JS closes or destroys
 * can never turn into a recycled fd number here), and reports back exactly once per connection:
 * the bytes each side read and wrote, and why it ended. JS keeps its own sockets open until then
 * and closes them on that report.
 *
 * Semantics match the JS relay: backpressure (a side is not read while its pipe still holds
 * bytes the other side has not taken), EOF forwarded as a half-close once the pipe is drained,
 * the connection done when both directions are done, an error or reset on either side ends it,
 * and an idle timeout over both directions. Only N-API (node_api.h) is used: no V8 ABI.
 *
 * connect() is the cheaper variant for a plain TCP upstream: JS hands over only the downstream
 * descriptor, the address to dial and the bytes it already read (ClientHello, PROXY header); the
 * relay opens the upstream socket itself, so Node never builds a socket object for it.
 * It reports once when the connect succeeded ("connected"), then the usual final report; a
 * connect that fails or times out is itself the final report.
 *
 * listen() goes one step further for a TLS-inspecting listener: the relay accepts the
 * connections itself and reads the first bytes (the ClientHello) into its own buffer, then hands
 * them to JS ("hello" report) together with the connection. JS decides from those bytes alone:
 * more bytes (more()), dial a plain TCP upstream and relay (acceptedConnect(): the bytes read go
 * first), or a Node socket for everything else (adopt(): JS replays the bytes). A connection that
 * takes the fast path never becomes a Node object at all. The listener's connection limit is
 * enforced here, at accept, counting adopted sockets until JS releases them.
 *
 * Learned routes (fast_route.h) go further still: for an SNI JS has routed to plain TCP once, the
 * relay routes the next connections itself (its own ClientHello scan, client_hello.h) and
 * reports them to JS as records in batches (onFast), never one call per connection. A listener
 * with learned routes then moves to the relay thread: a second struct relay with its own epoll
 * loop, so those connections never wake Node's loop. It hands Node's relay its records in batches
 * and the connections JS must decide on (uv_async); what both threads touch is listed at `worker`
 * in struct relay.
 *
 * Commands from JS are queued and never run inside the JS call that made them: those a report
 * handler queued run right after the turn's reports, others on the next turn. The reports of
 * one turn reach JS together, in one callback scope.
 */
#define _GNU_SOURCE
#include <node_api.h>
#include <uv.h>

#include "client_hello.h"
#include "fast_route.h"

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

/* Work done for one connection per wake-up before others get their turn (fairness). */
#define PUMP_BUDGET_BYTES (1u << 20)
#define MAX_EVENTS 256
#define HASH_BUCKETS 4096
/* The longest the relay waits between idle scans when nothing is due sooner. */
#define MAX_WAIT_MS 60000

enum reason {
  END_OK = 0, END_DOWN_RESET, END_UP_RESET, END_IDLE, END_STOPPED, END_INTERNAL, END_CONNECT_FAILED, END_CONNECT_TIMEOUT,
  CONNECTED, /* not an end: the progress report of connect() */
  HELLO      /* not an end: bytes read from an accepted connection, which now belongs to JS */
};
static const char *const REASONS[] = {
  "ok", "downstream_reset", "upstream_reset", "idle_timeout", "stopped", "internal_error", "upstream_connect_failed",
  "upstream_connect_timeout", "connected", "hello",
};
/* Hello report status: bytes arrived / the peer closed / the hello timeout passed / reset. */
enum hello_status { HELLO_DATA = 0, HELLO_CLOSED, HELLO_TIMEOUT, HELLO_RESET };
/* Accepts per listener per wake-up (a level-triggered listener wakes again for the rest). The relay
 * thread takes one, as nginx does by default: its passes are cheap (no Node loop around them), and
 * a pass that also serves the events already waiting saves the accept that would find nothing. */
#define ACCEPT_BATCH 64
#define WORKER_ACCEPT_BATCH 1
/* After EMFILE and the like, the listener rests this long before accepting again. */
#define ACCEPT_RETRY_MS 100
/* Empty pipe pairs kept for reuse while connections come and go (emptied POOL_IDLE_MS after none
 * is left). */
#define PIPE_POOL_MAX 64
/* A relay with no connection keeps its pooled pipes this long: a client connecting again and
 * again would otherwise cost two new pipes per connection. */
#define POOL_IDLE_MS 2000
/* Entries of the ALPN table (struct relay's alpn_tab). */
#define ALPN_TABLE 16

/*
 * One read moves at most this much through the relay's buffer. A short read proves the socket
 * empty (a short splice does not: the pipe may have run out of slots), so no read is spent on
 * EAGAIN; two TLS records of the largest size fit.
 */
#define COPY_BYTES 32768
/* Rounds of commands queued by a turn's report handlers run in that same turn. */
#define FOLLOW_UPS 4
/* Learned-route records wait at most this long for a call into JS that carries them: one call
 * per batch rather than per turn (counters and access-log lines are that much later). */
#define FAST_FLUSH_MS 100
/* The relay thread hands its records over once this many wait, whatever their age. */
#define WORKER_FLUSH_RECS 1024

struct conn;
struct listener;

/* What an epoll event points at: one side of one connection, or a listener (conn NULL, lst set). */
struct side {
  struct conn *conn;
  struct listener *lst;
  int which; /* 0 downstream, 1 upstream */
};

/*
 * A listening socket the relay accepts on (a dup of Node's, which JS then closes). The
 * limits are set from JS at any time; `open` counts connections accepted here and not yet closed
 * (adopted ones until JS releases them). Never freed before teardown: connections point at it.
 * The counts and limits are read and written atomically (the relay thread accepts too); fd,
 * closed, paused and resume_at belong to the relay that owns the listener.
 */
struct listener {
  uint32_t id;
  int fd;
  bool wildcard; /* bound to 0.0.0.0 / ::, so each connection's local address is looked up */
  uint32_t open, refused, max_conns, hello_cap, hello_timeout_ms;
  bool closed, paused;
  int64_t resume_at;
  /* SNIs JS routed to plain TCP: connections naming one are dialled here (NULL: none learned).
   * Guarded by the main relay's fast_lock. */
  struct fast_table *fast;
  struct side side;
  /* The relay accepting on it: Node's loop, or the relay thread once it has learned routes (set on
   * Node's thread only; a listener never moves back). */
  struct relay *owner;
  struct listener *next;  /* every listener ever made (Node's thread) */
  struct listener *wnext; /* the relay thread's own listeners */
};

/* One direction: src socket -> pipe -> dst socket. */
struct dir {
  int src, dst;
  int pr, pw;
  size_t cap;      /* pipe capacity in bytes */
  size_t inpipe;   /* bytes spliced in, not yet out */
  uint64_t in, out; /* bytes read from src / written to dst */
  bool eof, done;
  /* src may have bytes (or EOF) / dst may take bytes: cleared on EAGAIN (and rd on a short read,
   * see hup), set by the next edge, so a pass does not try a socket epoll has not announced
   * anything for since it would block. */
  bool rd, wr;
  /* src may have a FIN queued behind its bytes that no edge will announce again (an RDHUP event
   * came, or nothing is known yet): a short read does not prove it empty. Cleared on EAGAIN. */
  bool hup;
  /* src's FIN has arrived (an RDHUP event without an error): nothing can follow the bytes queued
   * before it, so a short read has taken them all and the FIN is next. */
  bool fin;
  /* Bytes JS already read, written to dst ahead of anything spliced (connect() only). */
  uint8_t *head;
  size_t head_len, head_off;
};

struct conn {
  uint32_t id;
  int fd[2]; /* dups: downstream, upstream */
  struct dir d2u, u2d;
  struct side sides[2];
  int64_t idle_ms, last_ms;
  /* connect(): the upstream is being dialled; nothing is pumped until it is connected. */
  bool connecting;
  int64_t connect_ms, connect_due;
  struct sockaddr_storage addr;
  socklen_t addrlen;
  int64_t keepalive; /* the upstream socket's TCP keep-alive (set_keepalive) */
  bool closed, queued;
  /* Reported to JS when it ends: every connection JS started (start, connect, acceptedConnect). */
  bool submitted;
  /* Accepted by the relay: counted in lst->open until closed (or released by JS). Its fd[0] is
   * then in the epoll set from the accept on (IN, OUT, RDHUP, edge-triggered), and the relay
   * owns both descriptors. */
  struct listener *lst;
  /* Hello stage (accepted, bytes not yet decided on by JS). */
  bool hello_stage;
  /* Reported to JS, no decision yet: its events only mark what is ready. */
  bool awaiting;
  uint8_t *hello;
  size_t hello_len, hello_alloc, hello_sent, hello_limit;
  int64_t hello_due, accept_ms;
  struct sockaddr_storage peer, local;
  struct hello_cursor cursor;
  /* Dialled on a learned route (never reported to JS as a connection of its own): the route,
   * the target and endpoint picked, counted in their slots until the end. */
  struct fast_route *froute;
  struct fast_pick fpick;
  int64_t dial_ms;
  /* Handed from the relay thread to Node's loop for JS to decide on, with this hello status. */
  int hstatus;
  struct conn *hnext;       /* hash chain */
  struct conn *prev, *next; /* all live connections */
  struct conn *qnext;       /* ready queue (budget ran out) or dead list */
};

struct result {
  struct result *next;
  uint32_t id;
  int reason;
  uint64_t down_read, up_written, up_read, down_written;
  /* HELLO: the connection (now JS's), the new bytes hello[from, from+len), and why now. */
  struct conn *conn;
  size_t from, len;
  int status;
};

enum cmd_kind { CMD_START, CMD_STOP, CMD_LISTEN, CMD_UNLISTEN, CMD_MORE, CMD_CLOSE_LISTENER };

struct cmd {
  enum cmd_kind kind;
  struct conn *conn;
  struct listener *lst;
  uint32_t id;
  struct cmd *next;
};

struct relay {
  /* The epoll set on Node's loop: its descriptor watched by `poll`; `timer` for deadlines and
   * for a turn soon after JS queued commands. Both are unreferenced while nothing is relayed. */
  uv_poll_t *poll;
  uv_timer_t *timer;
  /* in_turn: a turn runs, its reports and the commands their handlers queue included. */
  bool started, in_turn;
  int64_t timer_due; /* when `timer` fires (-1: not pending) */
  int ep;
  /* The report functions and the async context their calls run in. */
  napi_ref on_done, resource;
  napi_async_context async;
  struct cmd *cmds, *cmds_tail;
  uint32_t next_id;
  uint32_t active; /* started and not yet reported, plus one per accepting listener */
  /* Reports of the current turn, delivered at its end. */
  struct result *results, *results_tail;
  /* Empty pipe pairs for reuse. */
  int pipes[PIPE_POOL_MAX][2];
  size_t pipe_caps[PIPE_POOL_MAX];
  int npipes;
  int64_t pool_due; /* when an idle relay closes its pooled pipes (-1: not idle, or none) */
  /* Listeners: every one made, and the next id. */
  struct listener *listeners;
  uint32_t next_lid;
  /* Accepted connections JS has been told about and not yet decided on. */
  struct conn *awaiting[HASH_BUCKETS];
  napi_ref on_hello;
  /* JS's buffer that hello bytes are copied into (valid during the handler; no Buffer per report). */
  napi_ref scratch_ref;
  uint8_t *scratch;
  size_t scratch_len;
  napi_env env;
  /* Connections the relay holds. */
  struct conn *buckets[HASH_BUCKETS];
  struct conn *all;
  struct conn *ready, *dead;
  int64_t next_deadline; /* -1: none */
  /* Learned routes: what they report (fast_recs) goes to on_fast in batches, through fast_buf
   * (FAST_STRIDE doubles per record); slots are the active counts shared with JS. */
  napi_ref on_fast, fast_buf_ref, slots_ref;
  double *fast_buf;
  size_t fast_buf_recs;
  int32_t *slots;
  size_t nslots;
  uint64_t rng;
  struct fast_rec *recs;
  size_t nrecs, recs_cap;
  /* When the oldest undelivered record must go (-1: none waiting); `fast_now`: with this turn's
   * reports (a stopped listener just lost its last connection: a drain waiting on it gets its
   * lines). */
  int64_t fast_due;
  bool fast_now;
  /*
   * The relay thread. A listener that has learned routes moves there: its own epoll loop accepts,
   * reads the hello, routes, dials and relays without waking Node's loop, which then hears from it
   * only in batches (records, and the connections JS must decide on). Node's relay (`worker` set)
   * and the thread's (`main` set) are both a struct relay; what they share is named here.
   */
  struct relay *worker, *main;
  bool threads_ok; /* TLSGATE_RELAY_THREAD is not "0", and starting the thread has not failed */
  /* Node's relay: learned routes and their tables (the thread routes with them too). */
  pthread_mutex_t fast_lock;
  /* Node's relay: the thread's wake-up call (referenced while the thread relays connections);
   * connections it handed over, and its records, delivered with the next reports. */
  uv_async_t *wake_async;
  bool async_ref;
  /* async_ref as the thread may read it: while set, the thread's first connection needs no
   * wake-up of this loop to keep the process alive (see relay_ref). */
  bool async_reffed;
  /* Records the thread made that JS has not had yet (busy(): a shutdown waits for them). */
  uint32_t undelivered;
  struct conn *inbound;
  struct fast_rec *xrecs;
  size_t nx, x_cap;
  /* The thread's relay: lock guards cmds, handoffs and outbox; wake_fd (in its epoll set) says
   * commands wait; stopping ends the thread. */
  pthread_t thread;
  pthread_mutex_t lock;
  int wake_fd;
  struct side wake_side;
  bool woken, stopping, wake_main;
  struct listener *owned;
  /* Connections for JS: pending until the end of the thread's pass (an event later in the same
   * pass may still name them), then published in `handoffs`. */
  struct conn *hpend, *hpend_tail, *handoffs, *handoffs_tail;
  struct fast_rec *outbox;
  size_t nout, out_cap;
  /* Small exchanges go through here (recv, send) rather than through a direction's pipe. */
  uint8_t copy[COPY_BYTES];
  /* Node's relay: the ALPN lists start records named lately, mirrored by JS (deliver_fast), so a
   * list it has seen goes to JS as an index rather than a string per connection. */
  struct { size_t len; uint8_t b[HELLO_ALPN_MAX]; } alpn_tab[ALPN_TABLE];
  uint32_t alpn_used, alpn_next;
};

/* What a connection on a learned route reports: started (with what the access log needs when
 * it is on), connected, ended. */
enum fast_kind { FAST_START = 1, FAST_CONNECTED, FAST_END };
/* A record: kind, listener id, route id, target, endpoint, then by kind (START: [6] hello bytes,
 * and with the access log on, what deliver_fast puts in [5], [7]-[10], [14] and [15]; CONNECTED:
 * [5] connect ms; END: [5] reason, [6]-[9] the four byte counts, [10] hello bytes), [11] the
 * connection id, and as JS gets them, [12] ms since the accept and [13] ms since the record was
 * made (records wait for their batch). FAST_STRIDE in native-relay.ts must match (fastStride). */
#define FAST_STRIDE 16
struct fast_rec {
  double v[FAST_STRIDE];
  bool extras;
  struct sockaddr_storage peer, local;
  struct hello_info hello;
};

static void relay_ref(struct relay *r);
static void relay_unref(struct relay *r);

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void close_fd(int *fd) {
  if (*fd >= 0) close(*fd);
  *fd = -1;
}

/* Ids are unique across both relays (JS knows connections by id). */
static uint32_t new_id(struct relay *r) {
  struct relay *m = r->main ? r->main : r;
  uint32_t id;
  do id = __atomic_add_fetch(&m->next_id, 1, __ATOMIC_RELAXED); while (id == 0);
  return id;
}

static pthread_mutex_t *fast_mutex(struct relay *r) {
  return &(r->main ? r->main : r)->fast_lock;
}

static uint32_t load32(const uint32_t *p) {
  return __atomic_load_n(p, __ATOMIC_RELAXED);
}

/* A pipe for one direction: an empty one from the pool, else a new one. */
static bool make_pipe(struct relay *r, struct dir *d) {
  if (r->npipes > 0) {
    r->npipes--;
    d->pr = r->pipes[r->npipes][0];
    d->pw = r->pipes[r->npipes][1];
    d->cap = r->pipe_caps[r->npipes];
    return true;
  }
  int p[2];
  if (pipe2(p, O_NONBLOCK | O_CLOEXEC) != 0) return false;
  d->pr = p[0];
  d->pw = p[1];
  int cap = fcntl(p[0], F_GETPIPE_SZ);
  d->cap = cap > 0 ? (size_t)cap : 65536;
  return true;
}

/* Gives a direction's pipe back: to the pool when it is empty (no bytes left behind), else closed. */
static void drop_pipe(struct relay *r, struct dir *d) {
  if (d->pr < 0) return;
  if (d->inpipe == 0 && d->pw >= 0) {
    if (r->npipes < PIPE_POOL_MAX) {
      r->pipes[r->npipes][0] = d->pr;
      r->pipes[r->npipes][1] = d->pw;
      r->pipe_caps[r->npipes] = d->cap;
      r->npipes++;
      d->pr = d->pw = -1;
    }
  }
  close_fd(&d->pr);
  close_fd(&d->pw);
}

/* Closes the pooled pipes: with no connection left, an idle relay holds no descriptors. */
static void drain_pipe_pool(struct relay *r) {
  for (int i = 0; i < r->npipes; i++) {
    close(r->pipes[i][0]);
    close(r->pipes[i][1]);
  }
  r->npipes = 0;
}

/* Releases what a connection holds besides its struct: descriptors, the unsent head, the hello. */
static void free_conn_fds(struct relay *r, struct conn *c) {
  free(c->d2u.head);
  c->d2u.head = NULL;
  c->d2u.head_len = c->d2u.head_off = 0;
  free(c->hello);
  c->hello = NULL;
  close_fd(&c->fd[0]);
  close_fd(&c->fd[1]);
  drop_pipe(r, &c->d2u);
  drop_pipe(r, &c->u2d);
  if (c->lst) __atomic_sub_fetch(&c->lst->open, 1, __ATOMIC_RELAXED);
  c->lst = NULL;
}

/* ---- the relay loop ---------------------------------------------------------------------- */

static void hash_remove(struct relay *r, struct conn *c) {
  struct conn **p = &r->buckets[c->id % HASH_BUCKETS];
  while (*p && *p != c) p = &(*p)->hnext;
  if (*p) *p = c->hnext;
}

static struct conn *hash_find(struct relay *r, uint32_t id) {
  struct conn *c = r->buckets[id % HASH_BUCKETS];
  while (c && c->id != id) c = c->hnext;
  return c;
}

static void note_deadline(struct relay *r, int64_t due);

/* Queues a report; a turn's reports reach JS together when it ends. */
static void push_result(struct relay *r, struct result *res) {
  res->next = NULL;
  if (r->results_tail) r->results_tail->next = res; else r->results = res;
  r->results_tail = res;
}

/* Queues a report for JS: the final one, or CONNECTED (not an end). A failed malloc drops it. */
static void report(struct relay *r, struct conn *c, int reason) {
  struct result *res = calloc(1, sizeof *res);
  if (!res) return;
  res->id = c->id;
  res->reason = reason;
  res->down_read = c->d2u.in;
  res->up_written = c->d2u.out;
  res->up_read = c->u2d.in;
  res->down_written = c->u2d.out;
  push_result(r, res);
}

/* Ends a connection: out of epoll, descriptors closed, one report to JS. Freed after the batch. */
static void unlink_conn(struct relay *r, struct conn *c) {
  hash_remove(r, c);
  if (c->prev) c->prev->next = c->next; else if (r->all == c) r->all = c->next;
  if (c->next) c->next->prev = c->prev;
  c->prev = c->next = NULL;
}

static void link_conn(struct relay *r, struct conn *c) {
  c->hnext = r->buckets[c->id % HASH_BUCKETS];
  r->buckets[c->id % HASH_BUCKETS] = c;
  c->prev = NULL;
  c->next = r->all;
  if (r->all) r->all->prev = c;
  r->all = c;
}

/* A record for JS about a connection on a learned route; NULL (the record lost) without memory. */
static struct fast_rec *fast_rec(struct relay *r, struct conn *c, int kind) {
  if (r->nrecs == r->recs_cap) {
    size_t cap = r->recs_cap ? r->recs_cap * 2 : 64;
    struct fast_rec *g = realloc(r->recs, cap * sizeof *g);
    if (!g) return NULL;
    r->recs = g;
    r->recs_cap = cap;
  }
  if (r->nrecs == 0) r->fast_due = now_ms() + FAST_FLUSH_MS;
  if (r->main) __atomic_add_fetch(&r->main->undelivered, 1, __ATOMIC_RELAXED);
  struct fast_rec *f = &r->recs[r->nrecs++];
  memset(f->v, 0, sizeof f->v);
  f->extras = false;
  f->v[0] = kind;
  f->v[1] = c->lst ? c->lst->id : 0;
  f->v[2] = c->froute->id;
  f->v[3] = c->fpick.target;
  f->v[4] = c->fpick.host;
  f->v[11] = c->id;
  /* Clock readings; turned into "ms ago" when the record is delivered. */
  f->v[12] = (double)c->accept_ms;
  f->v[13] = (double)now_ms();
  return f;
}

/* The end of a connection on a learned route: its slots released, its record queued. */
static void fast_end(struct relay *r, struct conn *c, int reason) {
  struct fast_cluster *cl = &c->froute->clusters[c->fpick.target];
  /* A stopped listener's last connection: a drain waiting on it gets its lines at once. */
  if (c->lst && c->lst->closed && load32(&c->lst->open) <= 1) r->fast_now = true;
  __atomic_sub_fetch(&r->slots[cl->slot], 1, __ATOMIC_RELAXED);
  __atomic_sub_fetch(&r->slots[cl->hosts[c->fpick.host].slot], 1, __ATOMIC_RELAXED);
  struct fast_rec *f = fast_rec(r, c, FAST_END);
  if (f) {
    f->v[5] = reason;
    f->v[6] = (double)c->d2u.in;
    f->v[7] = (double)c->d2u.out;
    f->v[8] = (double)c->u2d.in;
    f->v[9] = (double)c->u2d.out;
    f->v[10] = (double)c->hello_sent;
  }
  /* Node's relay lets go when JS has the end record; the thread's records are not its own. */
  if (!f || r->main) relay_unref(r);
  pthread_mutex_lock(fast_mutex(r));
  fast_route_unref(c->froute);
  pthread_mutex_unlock(fast_mutex(r));
  c->froute = NULL;
}

static void finish(struct relay *r, struct conn *c, int reason) {
  if (c->closed) return;
  c->closed = true;
  if (c->froute) fast_end(r, c, reason);
  for (int i = 0; i < 2; i++) {
    /* JS still holds the same open file description, so closing our dup alone would not take
     * it out of the epoll set: remove it explicitly. A connection the relay accepted and dialled
     * itself has no other reference: the close does it. */
    if (c->fd[i] >= 0 && !c->lst) epoll_ctl(r->ep, EPOLL_CTL_DEL, c->fd[i], NULL);
  }
  free_conn_fds(r, c);
  unlink_conn(r, c);
  /* A connection still in its hello stage was never announced to JS: nothing to report. */
  if (c->submitted) report(r, c, reason);
  if (!c->queued) {
    c->qnext = r->dead;
    r->dead = c;
  }
  /* A queued connection is unlinked and freed when the ready queue reaches it. */
}

/*
 * One read of up to COPY_BYTES through the relay's buffer: sent on at once, and what dst does
 * not take waits in the (empty) pipe. A short read empties src unless a FIN may be queued
 * behind it (hup). Returns 1 on progress, 0 when src had nothing, -1 after ending the
 * connection on an error.
 */
static int copy_through(struct relay *r, struct conn *c, struct dir *d, int src_reason, int dst_reason, long *moved) {
  size_t want = d->cap < COPY_BYTES ? d->cap : COPY_BYTES;
  ssize_t n = recv(d->src, r->copy, want, 0);
  if (n == 0) {
    d->eof = true;
    (*moved)++;
    return 1;
  }
  if (n < 0) {
    if (errno == EAGAIN) {
      d->rd = false;
      d->hup = false;
      return 0;
    }
    if (errno == EINTR) return 0;
    finish(r, c, src_reason);
    return -1;
  }
  d->in += (uint64_t)n;
  *moved += n;
  /* No read for the 0 that would follow: the EOF is taken with the last bytes. */
  if ((size_t)n < want && d->fin) d->eof = true;
  else if ((size_t)n < want && !d->hup) d->rd = false;
  size_t off = 0;
  if (d->wr) {
    ssize_t w = send(d->dst, r->copy, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w > 0) {
      off = (size_t)w;
      d->out += (uint64_t)w;
      if (off < (size_t)n) d->wr = false; /* its buffer is full: EPOLLOUT says when to go on */
    } else if (errno == EAGAIN) {
      d->wr = false;
    } else if (errno != EINTR) {
      finish(r, c, dst_reason);
      return -1;
    }
  }
  if (off < (size_t)n) {
    ssize_t p = write(d->pw, r->copy + off, (size_t)n - off);
    if (p != (ssize_t)((size_t)n - off)) {
      finish(r, c, END_INTERNAL);
      return -1;
    }
    d->inpipe = (size_t)n - off;
  }
  return 1;
}

/*
 * Moves what it can in one direction until both ends would block (epoll then says when to go
 * on) or the budget is spent (*more is set: bytes may be waiting that no edge will announce).
 * Returns bytes moved, plus one for an EOF or a forwarded FIN, or -1 after ending the
 * connection on an error.
 */
static long pump_dir(struct relay *r, struct conn *c, struct dir *d, int src_reason, int dst_reason, bool *more) {
  long moved = 0;
  for (;;) {
    bool progress = false;
    if (!d->eof && d->rd && d->inpipe == 0 && d->head_len == 0) {
      int k = copy_through(r, c, d, src_reason, dst_reason, &moved);
      if (k < 0) return -1;
      if (k > 0) progress = true;
    } else if (!d->eof && d->rd && d->inpipe < d->cap) {
      ssize_t n = splice(d->src, NULL, d->pw, NULL, d->cap - d->inpipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
      if (n > 0) {
        d->inpipe += (size_t)n;
        d->in += (uint64_t)n;
        moved += n;
        progress = true;
      } else if (n == 0) {
        d->eof = true;
        moved++;
        progress = true;
      } else if (errno == EAGAIN) {
        d->rd = false;
        d->hup = false;
      } else if (errno != EINTR) {
        finish(r, c, src_reason);
        return -1;
      }
    }
    if (d->head_off < d->head_len && d->wr) {
      ssize_t n = send(d->dst, d->head + d->head_off, d->head_len - d->head_off, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) {
        d->head_off += (size_t)n;
        d->out += (uint64_t)n;
        moved += n;
        progress = true;
        if (d->head_off == d->head_len) {
          free(d->head);
          d->head = NULL;
          d->head_len = d->head_off = 0;
        }
      } else if (n < 0 && errno == EAGAIN) {
        d->wr = false;
      } else if (n < 0 && errno != EINTR) {
        finish(r, c, dst_reason);
        return -1;
      }
    }
    if (d->inpipe > 0 && d->head_len == 0 && d->wr) {
      ssize_t n = splice(d->pr, NULL, d->dst, NULL, d->inpipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
      if (n > 0) {
        d->inpipe -= (size_t)n;
        d->out += (uint64_t)n;
        moved += n;
        progress = true;
      } else if (n < 0 && errno == EAGAIN) {
        d->wr = false;
      } else if (n < 0 && errno != EINTR) {
        finish(r, c, dst_reason);
        return -1;
      }
    }
    if (d->eof && d->inpipe == 0 && d->head_len == 0 && !d->done) {
      /* Forward the FIN; the other direction keeps going (half-close). A peer that is already
       * gone makes this fail, and the other direction's own I/O reports that. When the other
       * direction is done too and the relay owns both descriptors, the close right after sends
       * this FIN. */
      const struct dir *o = d == &c->d2u ? &c->u2d : &c->d2u;
      if (!o->done || c->lst == NULL) shutdown(d->dst, SHUT_WR);
      d->done = true;
      moved++;
    }
    if (!progress) return moved;
    if ((size_t)moved >= PUMP_BUDGET_BYTES) {
      *more = true;
      return moved;
    }
  }
}

static void queue_ready(struct relay *r, struct conn *c) {
  if (c->queued || c->closed) return;
  c->queued = true;
  c->qnext = r->ready;
  r->ready = c;
}

/* The two directions are independent (separate pipes and socket buffers): one pass each. */
static void pump(struct relay *r, struct conn *c) {
  if (c->closed || c->connecting) return;
  bool more = false;
  long a = pump_dir(r, c, &c->d2u, END_DOWN_RESET, END_UP_RESET, &more);
  if (a < 0) return;
  long b = pump_dir(r, c, &c->u2d, END_UP_RESET, END_DOWN_RESET, &more);
  if (b < 0) return;
  if (a > 0 || b > 0) c->last_ms = now_ms();
  if (c->d2u.done && c->u2d.done) finish(r, c, END_OK);
  else if (more) queue_ready(r, c);
}

/* EPOLLERR on a TCP socket is a pending error (a reset, a timeout): nothing here uses the error
 * queue, the other source of it. Which error does not change the reason, so it is not read. */
static void on_error(struct relay *r, struct side *s) {
  struct conn *c = s->conn;
  finish(r, c, s->which == 0 ? END_DOWN_RESET : c->connecting ? END_CONNECT_FAILED : END_UP_RESET);
}

static void note_deadline(struct relay *r, int64_t due) {
  if (r->next_deadline < 0 || due < r->next_deadline) r->next_deadline = due;
}

/* The upstream is connected: tell JS, start the idle clock, and relay (the head goes first). */
static void connected(struct relay *r, struct conn *c) {
  c->connecting = false;
  c->last_ms = now_ms();
  if (c->idle_ms > 0) note_deadline(r, c->last_ms + c->idle_ms);
  if (c->submitted) {
    report(r, c, CONNECTED);
  } else if (c->froute) {
    struct fast_rec *f = fast_rec(r, c, FAST_CONNECTED);
    if (f) f->v[5] = (double)(c->last_ms - c->dial_ms);
  }
  pump(r, c);
}

/* An event on a connection still dialling: only the upstream's outcome matters (and a downstream
 * error, which ends it); downstream bytes wait in its socket until the relay starts. */
static void connect_event(struct relay *r, struct side *s, uint32_t ev) {
  struct conn *c = s->conn;
  if (s->which == 0) {
    if (ev & EPOLLERR) on_error(r, s);
    return;
  }
  /* Writable with no error or hang-up: connected (a failed dial always brings EPOLLERR). */
  if ((ev & EPOLLOUT) && !(ev & (EPOLLERR | EPOLLHUP))) {
    connected(r, c);
    return;
  }
  int err = 0;
  socklen_t len = sizeof err;
  if (getsockopt(c->fd[1], SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
  if (err != 0 || (!(ev & EPOLLOUT) && (ev & (EPOLLERR | EPOLLHUP)))) finish(r, c, END_CONNECT_FAILED);
  else if (ev & EPOLLOUT) connected(r, c);
}

/*
 * A cluster's TCP keep-alive (connectionPool.tcp.tcpKeepalive) as JS packs it (keepaliveWord in
 * native-relay.ts): -1 none; else idle seconds << 24 | interval seconds << 8 | probes, each 0
 * for the OS default.
 */
static bool keepalive_valid(int64_t ka) {
  return ka == -1 || (ka >= 0 && (ka >> 24) <= 32767 && ((ka >> 8) & 0xffff) <= 32767 && (ka & 0xff) <= 127);
}

/* SO_KEEPALIVE and each value given; the others stay at the OS default. False if one failed. */
static bool set_keepalive(int fd, int64_t ka) {
  if (ka < 0) return true;
  int one = 1, idle = (int)(ka >> 24), intvl = (int)((ka >> 8) & 0xffff), cnt = (int)(ka & 0xff);
  bool ok = setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one) == 0;
  if (idle) ok = setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle) == 0 && ok;
  if (intvl) ok = setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof intvl) == 0 && ok;
  if (cnt) ok = setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof cnt) == 0 && ok;
  return ok;
}

/* Opens and dials the upstream socket: 0 connected at once, 1 under way, -1 failed. */
static int start_connect(struct conn *c) {
  int fd = socket(c->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
  if (fd < 0) return -1;
  c->fd[1] = fd;
  c->d2u.dst = fd;
  c->u2d.src = fd;
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  /* None unless the DestinationRule asks, as Envoy does. */
  set_keepalive(fd, c->keepalive);
  if (connect(fd, (struct sockaddr *)&c->addr, c->addrlen) == 0) return 0;
  return errno == EINPROGRESS || errno == EINTR ? 1 : -1;
}

static void add_conn(struct relay *r, struct conn *c) {
  c->last_ms = now_ms();
  c->d2u.wr = c->u2d.wr = true;
  /* What is known of the reads: an accepted connection's from its hello stage and the edges
   * since; a socket being dialled has nothing yet (its first bytes bring an edge). */
  if (!c->lst) c->d2u.rd = true;
  c->u2d.rd = !c->connecting;
  link_conn(r, c);
  int dial = 0;
  if (c->connecting) {
    c->connect_due = c->last_ms + c->connect_ms;
    note_deadline(r, c->connect_due);
    /* Registered only once dialled: an unconnected TCP socket polls as writable and hung up. */
    dial = start_connect(c);
    if (dial < 0) {
      finish(r, c, END_CONNECT_FAILED);
      return;
    }
  } else if (c->idle_ms > 0) {
    note_deadline(r, c->last_ms + c->idle_ms);
  }
  for (int i = c->lst ? 1 : 0; i < 2; i++) {
    struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = &c->sides[i] };
    if (epoll_ctl(r->ep, EPOLL_CTL_ADD, c->fd[i], &ev) != 0) {
      finish(r, c, END_INTERNAL);
      return;
    }
  }
  if (!c->connecting) pump(r, c);
  else if (dial == 0) connected(r, c);
}

/* ---- accepted connections: the hello stage ---------------------------------------------- */

/* Hands the connection and the bytes read since the last report to JS, which now owns it. The
 * relay thread hands it to Node's relay first (published at the end of its pass), which does this
 * there (take_inbound). */
static void deliver_hello(struct relay *r, struct conn *c, int status) {
  if (r->main) {
    epoll_ctl(r->ep, EPOLL_CTL_DEL, c->fd[0], NULL);
    unlink_conn(r, c);
    c->awaiting = true; /* events later in this pass only mark what is ready */
    c->hstatus = status;
    c->qnext = NULL;
    if (r->hpend_tail) r->hpend_tail->qnext = c; else r->hpend = c;
    r->hpend_tail = c;
    return;
  }
  struct result *res = calloc(1, sizeof *res);
  if (!res) {
    finish(r, c, END_INTERNAL);
    return;
  }
  /* fd[0] stays in the epoll set: a dial reuses the registration, an adopt removes it. */
  c->awaiting = true;
  unlink_conn(r, c);
  res->id = c->id;
  res->reason = HELLO;
  res->conn = c;
  res->from = c->hello_sent;
  res->len = c->hello_len - c->hello_sent;
  res->status = status;
  c->hello_sent = c->hello_len;
  push_result(r, res);
}

/* What fast_try did: nothing (JS decides, on every byte read so far), dialled on a learned
 * route, or nothing yet because the hello is incomplete (the hello timeout still applies). */
enum fast_outcome { FAST_TO_JS = 0, FAST_DIALLED, FAST_WAIT };

/* A listener with learned routes looks at the hello itself. */
static enum fast_outcome fast_try(struct relay *r, struct conn *c) {
  pthread_mutex_t *mu = fast_mutex(r);
  pthread_mutex_lock(mu);
  struct fast_table *t = c->lst->fast;
  size_t max_hello = t ? t->max_hello : 0;
  bool log = t && t->log, any = t && t->count;
  pthread_mutex_unlock(mu);
  if (!any) return FAST_TO_JS;
  struct hello_info hi;
  enum hello_kind k = hello_scan(c->hello, c->hello_len, max_hello, &c->cursor, &hi);
  if (k == HELLO_NEED_MORE) return c->hello_len < c->hello_limit ? FAST_WAIT : FAST_TO_JS;
  if (k != HELLO_TLS) return FAST_TO_JS;
  if (!make_pipe(r, &c->d2u) || !make_pipe(r, &c->u2d)) {
    drop_pipe(r, &c->d2u);
    drop_pipe(r, &c->u2d);
    return FAST_TO_JS;
  }
  /* Picked and counted under the lock: JS may forget the table, and the picks' state is shared. */
  pthread_mutex_lock(mu);
  t = c->lst->fast;
  struct fast_route *rt = t ? fast_lookup(t, hi.sni_len >= 0 ? hi.sni : NULL, hi.sni_len) : NULL;
  struct fast_pick pk;
  bool ok = rt && fast_pick(rt, r->slots, r->nslots, &r->rng, &pk);
  if (ok) {
    struct fast_cluster *pc = &rt->clusters[pk.target];
    __atomic_add_fetch(&r->slots[pc->slot], 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&r->slots[pc->hosts[pk.host].slot], 1, __ATOMIC_RELAXED);
    rt->refs++;
    rt->started++;
  }
  pthread_mutex_unlock(mu);
  if (!ok) {
    drop_pipe(r, &c->d2u);
    drop_pipe(r, &c->u2d);
    return FAST_TO_JS;
  }
  /* The route is held (refs): its clusters and hosts stay until this connection lets go. */
  struct fast_cluster *cl = &rt->clusters[pk.target];
  struct fast_host *h = &cl->hosts[pk.host];
  c->froute = rt;
  c->fpick = pk;
  unlink_conn(r, c);
  c->hello_stage = false;
  /* From here on hello_sent is the count of hello bytes handed on (the head), for the end record. */
  c->hello_sent = c->hello_len;
  c->d2u.head = c->hello;
  c->d2u.head_len = c->hello_len;
  c->hello = NULL;
  c->hello_len = c->hello_alloc = 0;
  c->idle_ms = cl->idle_ms;
  c->connecting = true;
  c->connect_ms = cl->connect_ms;
  c->keepalive = cl->keepalive;
  c->addr = h->addr;
  c->addrlen = h->addrlen;
  c->dial_ms = now_ms();
  struct fast_rec *f = fast_rec(r, c, FAST_START);
  if (f) {
    f->v[6] = (double)c->hello_sent;
    if (log) {
      f->extras = true;
      f->peer = c->peer;
      f->local = c->local;
      f->hello = hi;
    }
  }
  relay_ref(r);
  add_conn(r, c);
  return FAST_DIALLED;
}

/*
 * Reads what the client sent (up to the listener's cap) and reports it when there is something
 * new, the peer closed or reset, or the cap is reached; otherwise waits for the next edge.
 */
static void hello_read(struct relay *r, struct conn *c) {
  int status = -1;
  c->d2u.rd = true; /* until a read shows otherwise (the cap may stop it first) */
  while (c->hello_len < c->hello_limit) {
    if (c->hello_len == c->hello_alloc) {
      size_t want = c->hello_alloc ? c->hello_alloc * 2 : 2048;
      if (want > c->hello_limit) want = c->hello_limit;
      uint8_t *b = realloc(c->hello, want);
      if (!b) {
        finish(r, c, END_INTERNAL);
        return;
      }
      c->hello = b;
      c->hello_alloc = want;
    }
    size_t room = c->hello_alloc - c->hello_len;
    ssize_t n = recv(c->fd[0], c->hello + c->hello_len, room, 0);
    if (n > 0) {
      c->hello_len += (size_t)n;
      /* A short read emptied the socket and the next bytes bring a new edge, unless a FIN may be
       * queued behind these (hup): then the next stage (more, relay) starts with a read. */
      if ((size_t)n < room) {
        c->d2u.rd = c->d2u.hup;
        break;
      }
      continue;
    }
    if (n == 0) {
      c->d2u.eof = true;
      status = HELLO_CLOSED;
    } else if (errno == EINTR) {
      continue;
    } else if (errno != EAGAIN) {
      status = HELLO_RESET;
    } else {
      c->d2u.rd = c->d2u.hup = false; /* empty, and no FIN yet: the next one brings an edge */
    }
    break;
  }
  /* Nothing reported yet: a learned route may take it, or the rest of its hello is awaited here.
   * While waiting, a FIN that may be queued behind the bytes (rd still set: no edge will announce
   * it again) is read now; that read either brings bytes or ends the wait. */
  if (status < 0 && c->hello_sent == 0) {
    enum fast_outcome f = fast_try(r, c);
    if (f == FAST_WAIT && c->d2u.rd) hello_read(r, c);
    if (f != FAST_TO_JS) return;
  }
  if (status >= 0 || c->hello_len > c->hello_sent) deliver_hello(r, c, status >= 0 ? status : HELLO_DATA);
}

/* Takes back a connection JS wants more bytes of. */
static void hello_resume(struct relay *r, struct conn *c) {
  c->awaiting = false;
  link_conn(r, c);
  if (c->d2u.eof || c->hello_len >= c->hello_limit) {
    /* Nothing more can come: say so at once rather than wait for an edge that never fires. */
    deliver_hello(r, c, c->d2u.eof ? HELLO_CLOSED : HELLO_DATA);
    return;
  }
  note_deadline(r, c->hello_due);
  /* Bytes that came while JS decided: read now (else the next edge brings them). */
  if (c->d2u.rd) hello_read(r, c);
}

static void accept_one(struct relay *r, struct listener *l, int fd, struct sockaddr_storage *peer) {
  struct conn *c = calloc(1, sizeof *c);
  if (!c) {
    close(fd);
    return;
  }
  c->keepalive = -1;
  __atomic_add_fetch(&l->open, 1, __ATOMIC_RELAXED);
  c->fd[0] = fd;
  c->fd[1] = c->d2u.pr = c->d2u.pw = c->u2d.pr = c->u2d.pw = -1;
  c->d2u.src = fd;
  c->u2d.dst = fd;
  c->d2u.dst = c->u2d.src = -1;
  c->lst = l;
  c->id = new_id(r);
  c->sides[0] = (struct side){ c, NULL, 0 };
  c->sides[1] = (struct side){ c, NULL, 1 };
  c->peer = *peer;
  if (l->wildcard) {
    socklen_t len = sizeof c->local;
    if (getsockname(fd, (struct sockaddr *)&c->local, &len) != 0) c->local.ss_family = AF_UNSPEC;
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  c->hello_stage = true;
  c->hello_limit = load32(&l->hello_cap);
  if (c->hello_limit == 0) c->hello_limit = 1;
  c->last_ms = c->accept_ms = now_ms();
  c->hello_due = c->last_ms + load32(&l->hello_timeout_ms);
  link_conn(r, c);
  /* Registered once for the connection's life with the relay: the hello stage acts on reads
   * only, and a dial keeps the registration (one epoll_ctl per accepted connection). */
  struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = &c->sides[0] };
  if (epoll_ctl(r->ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
    finish(r, c, END_INTERNAL);
    return;
  }
  note_deadline(r, c->hello_due);
  /* The client's first bytes often arrive with (or right after) the handshake's last ACK. */
  hello_read(r, c);
}

/* Accepts what is queued, up to a batch; over the listener's limit a connection is closed at once. */
static void accept_ready(struct relay *r, struct listener *l) {
  int batch = r->main ? WORKER_ACCEPT_BATCH : ACCEPT_BATCH;
  for (int i = 0; i < batch && !l->closed; i++) {
    struct sockaddr_storage peer;
    socklen_t plen = sizeof peer;
    int fd = accept4(l->fd, (struct sockaddr *)&peer, &plen, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO) continue;
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        /* Out of descriptors or memory: rest the listener instead of spinning on it. */
        struct epoll_event ev = { .events = 0, .data.ptr = &l->side };
        epoll_ctl(r->ep, EPOLL_CTL_MOD, l->fd, &ev);
        l->paused = true;
        l->resume_at = now_ms() + ACCEPT_RETRY_MS;
        note_deadline(r, l->resume_at);
      }
      return;
    }
    if (load32(&l->open) >= load32(&l->max_conns)) {
      close(fd);
      __atomic_add_fetch(&l->refused, 1, __ATOMIC_RELAXED);
      continue;
    }
    accept_one(r, l, fd, &peer);
  }
}

/* The descriptor stays open until the listener is removed: JS may still dup it (unlisten). */
static void listener_add(struct relay *r, struct listener *l) {
  if (l->owner != r || l->closed) return; /* moved to the relay thread before this ran, or removed */
  struct epoll_event ev = { .events = EPOLLIN, .data.ptr = &l->side };
  if (epoll_ctl(r->ep, EPOLL_CTL_ADD, l->fd, &ev) != 0) l->closed = true;
}

static void listener_remove(struct relay *r, struct listener *l) {
  if (!l->closed) epoll_ctl(r->ep, EPOLL_CTL_DEL, l->fd, NULL);
  l->closed = true;
  close_fd(&l->fd);
}

/* Rested listeners whose time has come accept again; returns the next resume time (-1: none). */
static int64_t resume_listeners(struct relay *r, int64_t now) {
  int64_t next = -1;
  for (struct listener *l = r->main ? r->owned : r->listeners; l; l = r->main ? l->wnext : l->next) {
    if (!l->paused || l->closed || l->owner != r) continue;
    if (l->resume_at <= now) {
      struct epoll_event ev = { .events = EPOLLIN, .data.ptr = &l->side };
      epoll_ctl(r->ep, EPOLL_CTL_MOD, l->fd, &ev);
      l->paused = false;
    } else if (next < 0 || l->resume_at < next) {
      next = l->resume_at;
    }
  }
  return next;
}

/* Connections the relay thread handed over: reported to JS from here, as if accepted here. */
static void take_inbound(struct relay *r) {
  while (r->inbound) {
    struct conn *c = r->inbound;
    r->inbound = c->qnext;
    c->qnext = NULL;
    c->awaiting = false;
    struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = &c->sides[0] };
    if (epoll_ctl(r->ep, EPOLL_CTL_ADD, c->fd[0], &ev) != 0) finish(r, c, END_INTERNAL);
    else deliver_hello(r, c, c->hstatus);
  }
}

static void run_commands(struct relay *r) {
  take_inbound(r);
  struct cmd *list = r->cmds;
  r->cmds = r->cmds_tail = NULL;
  while (list) {
    struct cmd *next = list->next;
    switch (list->kind) {
      case CMD_START:
        add_conn(r, list->conn);
        break;
      case CMD_STOP: {
        struct conn *c = hash_find(r, list->id);
        if (c && c->submitted) finish(r, c, END_STOPPED);
        break;
      }
      case CMD_LISTEN:
        listener_add(r, list->lst);
        break;
      case CMD_UNLISTEN:
        listener_remove(r, list->lst);
        break;
      case CMD_MORE:
        hello_resume(r, list->conn);
        break;
      case CMD_CLOSE_LISTENER:
        for (struct conn *c = r->all, *n; c; c = n) {
          n = c->next;
          if (c->lst == list->lst) finish(r, c, END_STOPPED);
        }
        break;
    }
    free(list);
    list = next;
  }
}

/* Ends idle connections and connects past their timeout; works out when the next is due. */
static void scan_idle(struct relay *r, int64_t now) {
  int64_t next = -1;
  struct conn *c = r->all;
  while (c) {
    struct conn *n = c->next;
    if (c->hello_stage) {
      if (c->hello_due <= now) deliver_hello(r, c, HELLO_TIMEOUT);
      else if (next < 0 || c->hello_due < next) next = c->hello_due;
    } else if (c->connecting) {
      if (c->connect_due <= now) finish(r, c, END_CONNECT_TIMEOUT);
      else if (next < 0 || c->connect_due < next) next = c->connect_due;
    } else if (c->idle_ms > 0) {
      int64_t due = c->last_ms + c->idle_ms;
      if (due <= now) finish(r, c, END_IDLE);
      else if (next < 0 || due < next) next = due;
    }
    c = n;
  }
  int64_t resume = resume_listeners(r, now);
  if (resume >= 0 && (next < 0 || resume < next)) next = resume;
  if (r->pool_due >= 0) {
    if (r->all != NULL || r->npipes == 0) {
      r->pool_due = -1;
    } else if (r->pool_due <= now) {
      drain_pipe_pool(r);
      r->pool_due = -1;
    } else if (next < 0 || r->pool_due < next) {
      next = r->pool_due;
    }
  }
  r->next_deadline = next;
}

static void deliver_results(struct relay *r);
static void schedule(struct relay *r);

/* Frees the connections ended this turn; a relay idle for POOL_IDLE_MS gives its pooled pipes
 * back (scan_idle), so an idle one holds no descriptors. */
static void free_dead(struct relay *r) {
  while (r->dead) {
    struct conn *d = r->dead;
    r->dead = d->qnext;
    free(d);
  }
  if (r->all != NULL) {
    r->pool_due = -1;
  } else if (r->npipes > 0 && r->pool_due < 0) {
    r->pool_due = now_ms() + POOL_IDLE_MS;
    note_deadline(r, r->pool_due);
  }
}
static void on_timer(uv_timer_t *t);

/* What the epoll set reported: accepts, hellos, dials, bytes to move. */
static void relay_events(struct relay *r, const struct epoll_event *evs, int n) {
  for (int i = 0; i < n; i++) {
    struct side *s = evs[i].data.ptr;
    if (!s->conn) {
      if (!s->lst) r->woken = true; /* the relay thread's wake-up: commands wait */
      else if (s->lst->owner == r && !s->lst->closed) accept_ready(r, s->lst);
      continue;
    }
    struct conn *c = s->conn;
    if (c->closed) continue;
    uint32_t e = evs[i].events;
    struct dir *from = s->which == 0 ? &c->d2u : &c->u2d;
    if (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) from->rd = true;
    if (e & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) from->hup = true;
    if ((e & EPOLLRDHUP) && !(e & EPOLLERR)) from->fin = true;
    /* JS is deciding on it: the flags say whether the next stage finds bytes to read. */
    if (c->awaiting) continue;
    if (c->hello_stage) {
      if (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) hello_read(r, c);
      continue;
    }
    if (c->connecting) {
      connect_event(r, s, e);
      continue;
    }
    if (e & (EPOLLOUT | EPOLLHUP | EPOLLERR)) (s->which == 0 ? &c->u2d : &c->d2u)->wr = true;
    if (e & EPOLLERR) on_error(r, s);
    pump(r, c);
  }
}

/* Connections whose budget ran out (another pass each, after everyone else's events), deadlines,
 * and the connections ended in this pass freed. */
static void relay_after(struct relay *r) {
  struct conn *q = r->ready;
  r->ready = NULL;
  while (q) {
    struct conn *next = q->qnext;
    q->queued = false;
    if (q->closed) {
      q->qnext = r->dead;
      r->dead = q;
    } else {
      pump(r, q);
    }
    q = next;
  }
  if (r->next_deadline >= 0) {
    int64_t now = now_ms();
    if (now >= r->next_deadline) scan_idle(r, now);
  }
  free_dead(r);
}

/*
 * One turn of the relay: the commands JS queued, what the epoll set has ready (at most
 * MAX_EVENTS; the poll fires again for the rest), connections whose budget ran out, deadlines;
 * then the turn's reports go to JS, and the next turn is scheduled.
 */
static void relay_turn(struct relay *r) {
  if (r->in_turn) return;
  r->in_turn = true;
  run_commands(r);
  struct epoll_event evs[MAX_EVENTS];
  int n = epoll_wait(r->ep, evs, MAX_EVENTS, 0);
  if (n < 0) n = 0;
  relay_events(r, evs, n);
  relay_after(r);
  deliver_results(r);
  /* What the handlers asked for (a dial, more bytes, a stop) runs now rather than a loop
   * iteration later; bounded, so a handler that always queues more cannot hold the loop. */
  for (int i = 0; i < FOLLOW_UPS && r->cmds; i++) {
    run_commands(r);
    free_dead(r);
    deliver_results(r);
  }
  r->in_turn = false;
  schedule(r);
}

/*
 * The next turn: at once after this loop iteration when work is queued, else at the next
 * deadline. A timer already due no later is left as it is (most turns change nothing: an idle
 * timeout an hour away), and one that fires early only costs a turn.
 */
static void schedule(struct relay *r) {
  if (!r->started) return;
  int64_t now = now_ms();
  int64_t due = r->ready || r->cmds ? now : r->next_deadline;
  if (r->nrecs && r->fast_due >= 0 && (due < 0 || r->fast_due < due)) due = r->fast_due;
  if (due < 0) return; /* nothing due: a pending timer just finds nothing to do */
  if (due > now + MAX_WAIT_MS) due = now + MAX_WAIT_MS;
  if (r->timer_due >= 0 && r->timer_due <= due) return;
  r->timer_due = due;
  uv_timer_start(r->timer, on_timer, (uint64_t)(due > now ? due - now : 0), 0);
}

static void on_timer(uv_timer_t *t) {
  struct relay *r = t->data;
  r->timer_due = -1;
  relay_turn(r);
}

static void on_poll(uv_poll_t *p, int status, int events) {
  (void)status;
  (void)events;
  relay_turn(p->data);
}

/* ---- reports and the JS interface --------------------------------------------------------- */

/* While connections are relayed or listeners accept, the relay keeps the process alive, as open
 * sockets would; with none, it never holds the event loop. */
static void relay_ref(struct relay *r) {
  if (r->main) {
    /* The thread's count: Node's relay reads it to reference the wake-up call (on_async), woken
     * for it only while the call is not referenced. Sequentially consistent with on_async's
     * store and load: one side always sees the other's write. */
    if (__atomic_fetch_add(&r->active, 1, __ATOMIC_SEQ_CST) == 0 && !__atomic_load_n(&r->main->async_reffed, __ATOMIC_SEQ_CST)) {
      r->wake_main = true;
    }
    return;
  }
  if (r->active++ == 0 && r->poll) uv_ref((uv_handle_t *)r->poll);
}

static void relay_unref(struct relay *r) {
  if (r->main) {
    /* No wake-up for the last one: the end record it leaves brings one within FAST_FLUSH_MS, and
     * Node's relay lets go of the call then. */
    if (r->active > 0) __atomic_sub_fetch(&r->active, 1, __ATOMIC_SEQ_CST);
    return;
  }
  if (r->active > 0 && --r->active == 0 && r->poll) uv_unref((uv_handle_t *)r->poll);
}

static void free_handle(uv_handle_t *h);

/* ---- the relay thread ---------------------------------------------------------------------- */

/* Appends n records to a growing array; false (they are lost) without memory. */
static bool append_recs(struct fast_rec **arr, size_t *len, size_t *cap, const struct fast_rec *from, size_t n) {
  if (*len + n > *cap) {
    size_t want = *cap ? *cap : 64;
    while (want < *len + n) want *= 2;
    struct fast_rec *g = realloc(*arr, want * sizeof *g);
    if (!g) return false;
    *arr = g;
    *cap = want;
  }
  memcpy(*arr + *len, from, n * sizeof *from);
  *len += n;
  return true;
}

/* Moves every record of `from` to the end of `to`: the arrays are swapped when `to` is empty (the
 * sender goes on in the receiver's old array), else copied. Returns how many were lost (no memory). */
static size_t move_recs(struct fast_rec **to, size_t *nto, size_t *cto, struct fast_rec **from, size_t *nfrom, size_t *cfrom) {
  size_t lost = 0;
  if (*nto == 0) {
    struct fast_rec *a = *to;
    size_t cap = *cto;
    *to = *from;
    *cto = *cfrom;
    *nto = *nfrom;
    *from = a;
    *cfrom = cap;
  } else if (!append_recs(to, nto, cto, *from, *nfrom)) {
    lost = *nfrom;
  }
  *nfrom = 0;
  return lost;
}

/* The end of the thread's pass: records that are due and connections for JS go to Node's relay,
 * which is woken for them, and when the thread starts relaying while Node's relay does not hold
 * the process for it. Having relayed its last connection, the thread wakes Node's relay with the
 * records that connection left (at most FAST_FLUSH_MS later), or at once when there are none. */
static void worker_publish(struct relay *r) {
  bool flush = r->nrecs > 0 && (r->fast_now || r->nrecs >= WORKER_FLUSH_RECS || now_ms() >= r->fast_due);
  if (r->nrecs == 0 && __atomic_load_n(&r->active, __ATOMIC_SEQ_CST) == 0 && __atomic_load_n(&r->main->async_reffed, __ATOMIC_SEQ_CST)) {
    r->wake_main = true;
  }
  if (!flush && !r->hpend && !r->wake_main) return;
  pthread_mutex_lock(&r->lock);
  if (flush) {
    size_t lost = move_recs(&r->outbox, &r->nout, &r->out_cap, &r->recs, &r->nrecs, &r->recs_cap);
    if (lost) __atomic_sub_fetch(&r->main->undelivered, (uint32_t)lost, __ATOMIC_RELAXED);
    r->fast_due = -1;
    r->fast_now = false;
  }
  if (r->hpend) {
    if (r->handoffs_tail) r->handoffs_tail->qnext = r->hpend; else r->handoffs = r->hpend;
    r->handoffs_tail = r->hpend_tail;
    r->hpend = r->hpend_tail = NULL;
  }
  pthread_mutex_unlock(&r->lock);
  r->wake_main = false;
  uv_async_send(r->main->wake_async);
}

static void worker_commands(struct relay *r) {
  uint64_t v;
  while (read(r->wake_fd, &v, sizeof v) < 0 && errno == EINTR) {}
  pthread_mutex_lock(&r->lock);
  struct cmd *list = r->cmds;
  r->cmds = r->cmds_tail = NULL;
  pthread_mutex_unlock(&r->lock);
  while (list) {
    struct cmd *next = list->next;
    struct listener *l = list->lst;
    switch (list->kind) {
      case CMD_LISTEN:
        l->wnext = r->owned;
        r->owned = l;
        listener_add(r, l);
        break;
      case CMD_UNLISTEN:
        listener_remove(r, l);
        break;
      case CMD_CLOSE_LISTENER:
        for (struct conn *c = r->all, *n; c; c = n) {
          n = c->next;
          if (c->lst == l) finish(r, c, END_STOPPED);
        }
        break;
      default:
        break;
    }
    free(list);
    list = next;
  }
}

/* How long the thread may sleep: until the next deadline or the oldest record's batch is due. */
static int worker_timeout(struct relay *r) {
  int64_t now = now_ms();
  int64_t due = r->ready ? now : r->next_deadline;
  if (r->nrecs && (due < 0 || r->fast_due < due)) due = r->fast_due;
  if (due < 0 || due - now > MAX_WAIT_MS) return MAX_WAIT_MS;
  return due > now ? (int)(due - now) : 0;
}

static void *worker_main(void *arg) {
  struct relay *r = arg;
  struct epoll_event evs[MAX_EVENTS];
  while (!__atomic_load_n(&r->stopping, __ATOMIC_ACQUIRE)) {
    int n = epoll_wait(r->ep, evs, MAX_EVENTS, worker_timeout(r));
    if (n < 0) n = 0;
    relay_events(r, evs, n);
    if (r->woken) {
      r->woken = false;
      worker_commands(r);
    }
    relay_after(r);
    worker_publish(r);
  }
  return NULL;
}

/* A command for the relay thread, which it runs on its next pass. */
static bool worker_cmd(struct relay *m, enum cmd_kind kind, struct listener *l) {
  struct relay *w = m->worker;
  struct cmd *cmd = calloc(1, sizeof *cmd);
  if (!cmd) return false;
  cmd->kind = kind;
  cmd->lst = l;
  pthread_mutex_lock(&w->lock);
  if (w->cmds_tail) w->cmds_tail->next = cmd; else w->cmds = cmd;
  w->cmds_tail = cmd;
  pthread_mutex_unlock(&w->lock);
  uint64_t one = 1;
  while (write(w->wake_fd, &one, sizeof one) < 0 && errno == EINTR) {}
  return true;
}

/* Node's side of the wake-up: what the thread handed over, then a turn that reports it. */
static void on_async(uv_async_t *a) {
  struct relay *r = a->data, *w = r->worker;
  pthread_mutex_lock(&w->lock);
  struct conn *in = w->handoffs;
  w->handoffs = w->handoffs_tail = NULL;
  size_t lost = w->nout ? move_recs(&r->xrecs, &r->nx, &r->x_cap, &w->outbox, &w->nout, &w->out_cap) : 0;
  if (lost) __atomic_sub_fetch(&r->undelivered, (uint32_t)lost, __ATOMIC_RELAXED);
  pthread_mutex_unlock(&w->lock);
  /* Cleared before the count is read (relay_ref reads them the other way round). */
  __atomic_store_n(&r->async_reffed, false, __ATOMIC_SEQ_CST);
  uint32_t live = __atomic_load_n(&w->active, __ATOMIC_SEQ_CST);
  if (live > 0) __atomic_store_n(&r->async_reffed, true, __ATOMIC_SEQ_CST);
  if (in) {
    struct conn *t = in;
    while (t->qnext) t = t->qnext;
    t->qnext = r->inbound;
    r->inbound = in;
  }
  /* Connections on the thread keep the process alive, as the relay's own do. */
  if (live > 0 && !r->async_ref) uv_ref((uv_handle_t *)r->wake_async);
  else if (live == 0 && r->async_ref) uv_unref((uv_handle_t *)r->wake_async);
  r->async_ref = live > 0;
  relay_turn(r);
}

/* Starts the relay thread on first use; false (and threads_ok cleared) when it cannot. */
static bool ensure_worker(napi_env env, struct relay *m) {
  if (m->worker) return true;
  if (!m->threads_ok) return false;
  m->threads_ok = false;
  uv_loop_t *loop = NULL;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok || !loop) return false;
  struct relay *w = calloc(1, sizeof *w);
  uv_async_t *a = calloc(1, sizeof *a);
  if (!w || !a) goto fail;
  w->main = m;
  w->env = env;
  w->next_deadline = w->fast_due = w->timer_due = w->pool_due = -1;
  w->slots = m->slots;
  w->nslots = m->nslots;
  w->rng = m->rng ^ 0xD1B54A32D192ED03ULL;
  if (w->rng == 0) w->rng = 1;
  w->wake_fd = -1;
  w->ep = epoll_create1(EPOLL_CLOEXEC);
  if (w->ep < 0) goto fail;
  w->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  w->wake_side = (struct side){ NULL, NULL, 3 };
  struct epoll_event ev = { .events = EPOLLIN, .data.ptr = &w->wake_side };
  if (w->wake_fd < 0 || epoll_ctl(w->ep, EPOLL_CTL_ADD, w->wake_fd, &ev) != 0) goto fail;
  if (pthread_mutex_init(&w->lock, NULL) != 0) goto fail;
  if (uv_async_init(loop, a, on_async) != 0) {
    pthread_mutex_destroy(&w->lock);
    goto fail;
  }
  a->data = m;
  uv_unref((uv_handle_t *)a);
  /* Signals stay with Node's thread. */
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  int err = pthread_create(&w->thread, NULL, worker_main, w);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (err != 0) {
    uv_close((uv_handle_t *)a, free_handle);
    pthread_mutex_destroy(&w->lock);
    a = NULL;
    goto fail;
  }
  pthread_setname_np(w->thread, "tlsgate-relay");
  m->wake_async = a;
  m->worker = w;
  m->threads_ok = true;
  return true;
fail:
  if (w) {
    close_fd(&w->ep);
    close_fd(&w->wake_fd);
  }
  free(w);
  free(a);
  return false;
}

/* Accepted connections JS holds (hello reported, no decision yet). */
static void awaiting_put(struct relay *r, struct conn *c) {
  c->hnext = r->awaiting[c->id % HASH_BUCKETS];
  r->awaiting[c->id % HASH_BUCKETS] = c;
}

static struct conn *awaiting_take(struct relay *r, uint32_t id) {
  struct conn **p = &r->awaiting[id % HASH_BUCKETS];
  while (*p && (*p)->id != id) p = &(*p)->hnext;
  struct conn *c = *p;
  if (c) {
    *p = c->hnext;
    c->hnext = NULL;
  }
  return c;
}

/* "1.2.3.4" / "::1" and the port, or "" and 0 for an address the kernel did not give. */
static void address_values(napi_env env, const struct sockaddr_storage *a, napi_value *addr, napi_value *port) {
  char buf[INET6_ADDRSTRLEN] = "";
  unsigned p = 0;
  if (a->ss_family == AF_INET) {
    const struct sockaddr_in *a4 = (const struct sockaddr_in *)a;
    inet_ntop(AF_INET, &a4->sin_addr, buf, sizeof buf);
    p = ntohs(a4->sin_port);
  } else if (a->ss_family == AF_INET6) {
    const struct sockaddr_in6 *a6 = (const struct sockaddr_in6 *)a;
    inet_ntop(AF_INET6, &a6->sin6_addr, buf, sizeof buf);
    p = ntohs(a6->sin6_port);
  }
  napi_create_string_latin1(env, buf, NAPI_AUTO_LENGTH, addr);
  napi_create_uint32(env, p, port);
}

static void call_one(napi_env env, struct relay *r, napi_value cb, napi_value undef, struct result *res) {
  if (res->reason == HELLO) {
    struct conn *c = res->conn;
    awaiting_put(r, c);
    napi_value on_hello;
    if (!r->on_hello || napi_get_reference_value(env, r->on_hello, &on_hello) != napi_ok) return;
    /* onHello(listenerId, id, fd, bytes, status, remoteAddress, remotePort, localAddress, localPort,
     * msSinceAccept); the addresses and the age only with a connection's first report. */
    napi_value argv[10];
    napi_create_uint32(env, c->lst ? c->lst->id : 0, &argv[0]);
    napi_create_uint32(env, c->id, &argv[1]);
    napi_create_int32(env, c->fd[0], &argv[2]);
    if (res->len <= r->scratch_len) {
      /* The handler gets the length; the bytes are in the buffer it gave init(). */
      if (res->len) memcpy(r->scratch, c->hello + res->from, res->len);
      napi_create_uint32(env, (uint32_t)res->len, &argv[3]);
    } else {
      void *copy;
      napi_create_buffer_copy(env, res->len, c->hello + res->from, &copy, &argv[3]);
    }
    napi_create_int32(env, res->status, &argv[4]);
    if (res->from == 0) {
      address_values(env, &c->peer, &argv[5], &argv[6]);
      address_values(env, &c->local, &argv[7], &argv[8]);
      int64_t age = now_ms() - c->accept_ms;
      napi_create_double(env, (double)(age > 0 ? age : 0), &argv[9]);
    } else {
      argv[5] = argv[6] = argv[7] = argv[8] = argv[9] = undef;
    }
    napi_call_function(env, undef, on_hello, 10, argv, NULL);
    return;
  }
  if (res->reason != CONNECTED) relay_unref(r);
  napi_value argv[6];
  napi_create_uint32(env, res->id, &argv[0]);
  napi_create_double(env, (double)res->down_read, &argv[1]);
  napi_create_double(env, (double)res->up_written, &argv[2]);
  napi_create_double(env, (double)res->up_read, &argv[3]);
  napi_create_double(env, (double)res->down_written, &argv[4]);
  napi_create_string_utf8(env, REASONS[res->reason], NAPI_AUTO_LENGTH, &argv[5]);
  napi_call_function(env, undef, cb, 6, argv, NULL);
}

/* An IPv4 address as a number (and its port); -2 (port 0) for none (a listener's own address
 * is not looked up per connection unless it is a wildcard); -1: the address goes as a string. */
static double ip4_value(const struct sockaddr_storage *a, double *port) {
  *port = 0;
  if (a->ss_family == AF_UNSPEC) return -2;
  if (a->ss_family != AF_INET) return -1;
  const struct sockaddr_in *a4 = (const struct sockaddr_in *)a;
  *port = ntohs(a4->sin_port);
  return (double)ntohl(a4->sin_addr.s_addr);
}

/* The index of an ALPN list in the table JS mirrors; *fresh when it was put there just now. */
static uint32_t alpn_index(struct relay *r, const uint8_t *b, size_t len, bool *fresh) {
  for (uint32_t i = 0; i < r->alpn_used; i++) {
    if (r->alpn_tab[i].len == len && memcmp(r->alpn_tab[i].b, b, len) == 0) {
      *fresh = false;
      return i;
    }
  }
  uint32_t i = r->alpn_used < ALPN_TABLE ? r->alpn_used++ : r->alpn_next++ % ALPN_TABLE;
  r->alpn_tab[i].len = len;
  memcpy(r->alpn_tab[i].b, b, len);
  *fresh = true;
  return i;
}

static void push_extra(napi_env env, napi_value *arr, uint32_t *nx, napi_value v) {
  if (*nx == 0) napi_create_array(env, arr);
  napi_set_element(env, *arr, (*nx)++, v);
}

/* An address of a start record as ip4_value gives it; one that is not IPv4 goes to extras as a string. */
static void address_field(napi_env env, const struct sockaddr_storage *a, double *addr, double *port, napi_value *extras, uint32_t *nx) {
  *addr = ip4_value(a, port);
  if (*addr != -1) return;
  napi_value text, unused;
  address_values(env, a, &text, &unused);
  push_extra(env, extras, nx, text);
  if (a->ss_family == AF_INET6) *port = ntohs(((const struct sockaddr_in6 *)a)->sin6_port);
}

/* What the access log needs of a start record, as numbers where they can be (the SNI is the
 * route's own): [5] the peer's IPv4 address, [7] its port, [8] and [9] the local address and
 * port (ip4_value), [14] the ALPN list's index in JS's mirror of alpn_tab (-1: no list), [15]
 * flags (1: ECH; 2: the list is new at that index). Strings go in `extras` from index [10] on,
 * in this order: the peer's address when [5] is -1 (IPv6), the local one when [8] is -1, the
 * new ALPN list (latin1, length-prefixed names as sent). */
static void fast_start_fields(napi_env env, struct relay *r, double *out, const struct fast_rec *f, napi_value *extras, uint32_t *nx) {
  out[10] = *nx;
  address_field(env, &f->peer, &out[5], &out[7], extras, nx);
  address_field(env, &f->local, &out[8], &out[9], extras, nx);
  double flags = f->hello.ech ? 1 : 0;
  out[14] = -1;
  if (f->hello.alpn_len > 0) {
    bool fresh;
    out[14] = alpn_index(r, f->hello.alpn, f->hello.alpn_len, &fresh);
    if (fresh) {
      napi_value a;
      napi_create_string_latin1(env, (const char *)f->hello.alpn, f->hello.alpn_len, &a);
      push_extra(env, extras, nx, a);
      flags += 2;
    }
  }
  out[15] = flags;
}

/* Learned-route records: onFast(count, extras) per bufferful, the records in fast_buf. The end
 * records of Node's relay let go of what kept the process alive for them (own_ends). */
static void deliver_fast(napi_env env, struct relay *r, napi_value undef, bool live, const struct fast_rec *recs, size_t nrecs, bool own_ends) {
  napi_value fn;
  if (live) live = r->on_fast && r->fast_buf && napi_get_reference_value(env, r->on_fast, &fn) == napi_ok;
  for (size_t i = 0; i < nrecs;) {
    size_t n = nrecs - i;
    if (live && n > r->fast_buf_recs) n = r->fast_buf_recs;
    if (live) {
      napi_handle_scope each;
      napi_open_handle_scope(env, &each);
      napi_value extras = undef;
      uint32_t nx = 0;
      double now = (double)now_ms();
      for (size_t k = 0; k < n; k++) {
        const struct fast_rec *f = &recs[i + k];
        double *out = r->fast_buf + k * FAST_STRIDE;
        memcpy(out, f->v, sizeof f->v);
        out[12] = now - f->v[12];
        out[13] = now - f->v[13];
        if (f->v[0] == FAST_START) out[10] = -1;
        if (f->extras) fast_start_fields(env, r, out, f, &extras, &nx);
      }
      napi_value argv[2];
      napi_create_uint32(env, (uint32_t)n, &argv[0]);
      argv[1] = extras;
      napi_call_function(env, undef, fn, 2, argv, NULL);
      bool pending = false;
      if (napi_is_exception_pending(env, &pending) == napi_ok && pending) {
        napi_value e;
        napi_get_and_clear_last_exception(env, &e);
        napi_fatal_exception(env, e);
      }
      napi_close_handle_scope(env, each);
    }
    if (own_ends) for (size_t k = 0; k < n; k++) if (recs[i + k].v[0] == FAST_END) relay_unref(r);
    i += n;
  }
}

/* A turn's reports, in order, inside one callback scope (microtasks run once, at its end). */
static void deliver_results(struct relay *r) {
  struct result *list = r->results;
  /* Records ride along with reports; on their own they wait for a batch (see FAST_FLUSH_MS). */
  bool fast = r->nrecs > 0 && (list || r->fast_now || r->nrecs >= r->fast_buf_recs || now_ms() >= r->fast_due);
  /* The relay thread's records come already batched. */
  bool xfast = r->nx > 0;
  if (!list && !fast && !xfast) return;
  r->results = r->results_tail = NULL;
  napi_env env = r->env;
  napi_handle_scope hs;
  napi_value cb, resource, undef;
  if (napi_open_handle_scope(env, &hs) != napi_ok) return;
  napi_callback_scope cs = NULL;
  bool live = r->on_done && napi_get_reference_value(env, r->on_done, &cb) == napi_ok &&
    napi_get_reference_value(env, r->resource, &resource) == napi_ok &&
    napi_open_callback_scope(env, resource, r->async, &cs) == napi_ok;
  napi_get_undefined(env, &undef);
  while (list) {
    struct result *next = list->next;
    if (live) {
      napi_handle_scope each;
      napi_open_handle_scope(env, &each);
      call_one(env, r, cb, undef, list);
      /* A handler that threw: reported as an uncaught exception would be; the batch goes on. */
      bool pending = false;
      if (napi_is_exception_pending(env, &pending) == napi_ok && pending) {
        napi_value e;
        napi_get_and_clear_last_exception(env, &e);
        napi_fatal_exception(env, e);
      }
      napi_close_handle_scope(env, each);
    } else if (list->reason == HELLO) {
      free_conn_fds(r, list->conn);
      free(list->conn);
    }
    free(list);
    list = next;
  }
  if (fast) {
    deliver_fast(env, r, undef, live, r->recs, r->nrecs, true);
    r->nrecs = 0;
    r->fast_due = -1;
    r->fast_now = false;
  }
  if (xfast) {
    deliver_fast(env, r, undef, live, r->xrecs, r->nx, false);
    __atomic_sub_fetch(&r->undelivered, (uint32_t)r->nx, __ATOMIC_RELAXED);
    r->nx = 0;
  }
  if (cs) napi_close_callback_scope(env, cs);
  napi_close_handle_scope(env, hs);
}

/* Queues a command: after the turn's reports when a report handler queued it, else for a turn
 * right after this loop iteration. */
static void push_cmd(struct relay *r, struct cmd *c) {
  c->next = NULL;
  if (r->cmds_tail) r->cmds_tail->next = c; else r->cmds = c;
  r->cmds_tail = c;
  /* Inside a turn (a report handler), the turn runs it or schedules the next one. */
  if (!r->in_turn) {
    r->timer_due = now_ms();
    uv_timer_start(r->timer, on_timer, 0, 0);
  }
}

static napi_value throw_errno(napi_env env, const char *what) {
  char msg[160];
  snprintf(msg, sizeof msg, "%s: %s", what, strerror(errno));
  napi_throw_error(env, NULL, msg);
  return NULL;
}

static void free_handle(uv_handle_t *h) {
  free(h);
}

/* The epoll set and its two handles on Node's loop, made on first use. */
static bool ensure_loop(napi_env env, struct relay *r) {
  if (r->started) return true;
  uv_loop_t *loop = NULL;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok || !loop) {
    napi_throw_error(env, NULL, "no event loop");
    return false;
  }
  r->ep = epoll_create1(EPOLL_CLOEXEC);
  if (r->ep < 0) return throw_errno(env, "epoll_create1"), false;
  r->poll = calloc(1, sizeof *r->poll);
  r->timer = calloc(1, sizeof *r->timer);
  if (!r->poll || !r->timer || uv_poll_init(loop, r->poll, r->ep) != 0) {
    free(r->poll);
    free(r->timer);
    r->poll = NULL;
    r->timer = NULL;
    close_fd(&r->ep);
    napi_throw_error(env, NULL, "cannot watch the relay's epoll set");
    return false;
  }
  uv_timer_init(loop, r->timer);
  r->poll->data = r->timer->data = r;
  uv_poll_start(r->poll, UV_READABLE, on_poll);
  /* Only relayed connections and listeners keep the process alive (relay_ref). */
  uv_unref((uv_handle_t *)r->poll);
  uv_unref((uv_handle_t *)r->timer);
  r->started = true;
  return true;
}

static int get_int(napi_env env, napi_value v, int64_t *out) {
  return napi_get_value_int64(env, v, out) == napi_ok ? 0 : -1;
}

/*
 * A connection for the relay: the downstream dup, pipes, an id. upFd < 0: connect() dials
 * the upstream on the relay's next turn. NULL (with a JS exception pending) when setup failed:
 * nothing is left open.
 */
static struct conn *new_conn(napi_env env, struct relay *r, int64_t down, int64_t up, int64_t idle) {
  if (!r->on_done) {
    napi_throw_error(env, NULL, "relay not initialised");
    return NULL;
  }
  if (!ensure_loop(env, r)) return NULL;
  struct conn *c = calloc(1, sizeof *c);
  if (!c) {
    napi_throw_error(env, NULL, "out of memory");
    return NULL;
  }
  c->fd[0] = c->fd[1] = c->d2u.pr = c->d2u.pw = c->u2d.pr = c->u2d.pw = -1;
  c->keepalive = -1;
  c->fd[0] = fcntl((int)down, F_DUPFD_CLOEXEC, 0);
  if (up >= 0) c->fd[1] = fcntl((int)up, F_DUPFD_CLOEXEC, 0);
  if (c->fd[0] < 0 || (up >= 0 && c->fd[1] < 0) || !make_pipe(r, &c->d2u) || !make_pipe(r, &c->u2d)) {
    int saved = errno;
    free_conn_fds(r, c);
    free(c);
    errno = saved;
    throw_errno(env, "relay setup");
    return NULL;
  }
  c->id = new_id(r);
  /* JS's sockets: whether a FIN is already queued is unknown, so the first pass reads to EAGAIN. */
  c->d2u.hup = c->u2d.hup = true;
  c->d2u.src = c->fd[0];
  c->d2u.dst = c->fd[1];
  c->u2d.src = c->fd[1];
  c->u2d.dst = c->fd[0];
  c->idle_ms = idle;
  c->sides[0] = (struct side){ c, NULL, 0 };
  c->sides[1] = (struct side){ c, NULL, 1 };
  return c;
}

/* Hands a set-up connection to the relay; returns its id (or NULL, nothing started). */
static napi_value submit(napi_env env, struct relay *r, struct conn *c) {
  struct cmd *cmd = calloc(1, sizeof *cmd);
  if (!cmd) {
    free_conn_fds(r, c);
    free(c);
    napi_throw_error(env, NULL, "out of memory");
    return NULL;
  }
  cmd->kind = CMD_START;
  cmd->conn = c;
  c->submitted = true;
  relay_ref(r);
  /* Once pushed, `c` belongs to the relay, whose next turn may finish and free it (a peer that
   * already reset): nothing of it is read here after push_cmd. */
  uint32_t cid = c->id;
  push_cmd(r, cmd);
  napi_value id;
  napi_create_uint32(env, cid, &id);
  return id;
}

/* start(downFd, upFd, idleTimeoutMs, downEof, upEof) -> id */
static napi_value js_start(napi_env env, napi_callback_info info) {
  struct relay *r;
  size_t argc = 5;
  napi_value argv[5];
  napi_get_cb_info(env, info, &argc, argv, NULL, (void **)&r);
  int64_t down, up, idle;
  bool down_eof = false, up_eof = false;
  if (argc < 5 || get_int(env, argv[0], &down) || get_int(env, argv[1], &up) || get_int(env, argv[2], &idle) ||
      napi_get_value_bool(env, argv[3], &down_eof) != napi_ok || napi_get_value_bool(env, argv[4], &up_eof) != napi_ok ||
      down < 0 || up < 0 || down > INT32_MAX || up > INT32_MAX || idle < 0) {
    napi_throw_type_error(env, NULL, "start(downFd, upFd, idleTimeoutMs, downEof, upEof)");
    return NULL;
  }
  struct conn *c = new_conn(env, r, down, up, idle);
  if (!c) return NULL;
  c->d2u.eof = down_eof;
  c->u2d.eof = up_eof;
  return submit(env, r, c);
}

/* Parses an IPv4 or IPv6 literal and port into addr; false when it is neither. */
static bool parse_address(const char *ip, int64_t port, struct sockaddr_storage *addr, socklen_t *addrlen) {
  memset(addr, 0, sizeof *addr);
  struct sockaddr_in *a4 = (struct sockaddr_in *)addr;
  struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)addr;
  if (inet_pton(AF_INET, ip, &a4->sin_addr) == 1) {
    a4->sin_family = AF_INET;
    a4->sin_port = htons((uint16_t)port);
    *addrlen = sizeof *a4;
    return true;
  }
  if (inet_pton(AF_INET6, ip, &a6->sin6_addr) == 1) {
    a6->sin6_family = AF_INET6;
    a6->sin6_port = htons((uint16_t)port);
    *addrlen = sizeof *a6;
    return true;
  }
  return false;
}

/* connect(downFd, ip, port, connectTimeoutMs, idleTimeoutMs, downEof, head, keepalive) -> id */
static napi_value js_connect(napi_env env, napi_callback_info info) {
  struct relay *r;
  size_t argc = 8;
  napi_value argv[8];
  napi_get_cb_info(env, info, &argc, argv, NULL, (void **)&r);
  static const char usage[] = "connect(downFd, ip, port, connectTimeoutMs, idleTimeoutMs, downEof, head, keepalive)";
  int64_t down, port, ctimeout, idle, ka;
  bool down_eof = false, is_buf = false;
  char ip[64];
  size_t iplen = 0;
  if (argc < 8 || get_int(env, argv[0], &down) || napi_get_value_string_utf8(env, argv[1], ip, sizeof ip, &iplen) != napi_ok ||
      get_int(env, argv[2], &port) || get_int(env, argv[3], &ctimeout) || get_int(env, argv[4], &idle) ||
      napi_get_value_bool(env, argv[5], &down_eof) != napi_ok || napi_is_buffer(env, argv[6], &is_buf) != napi_ok || !is_buf ||
      get_int(env, argv[7], &ka) || !keepalive_valid(ka) ||
      down < 0 || down > INT32_MAX || port <= 0 || port > 65535 || ctimeout <= 0 || idle < 0 || iplen >= sizeof ip - 1) {
    napi_throw_type_error(env, NULL, usage);
    return NULL;
  }
  struct sockaddr_storage addr;
  socklen_t addrlen;
  if (!parse_address(ip, port, &addr, &addrlen)) {
    napi_throw_type_error(env, NULL, "connect: not an IPv4 or IPv6 address");
    return NULL;
  }
  void *data = NULL;
  size_t len = 0;
  napi_get_buffer_info(env, argv[6], &data, &len);
  uint8_t *head = NULL;
  if (len > 0) {
    head = malloc(len);
    if (!head) {
      napi_throw_error(env, NULL, "out of memory");
      return NULL;
    }
    memcpy(head, data, len);
  }
  struct conn *c = new_conn(env, r, down, -1, idle);
  if (!c) {
    free(head);
    return NULL;
  }
  c->d2u.eof = down_eof;
  c->d2u.head = head;
  c->d2u.head_len = len;
  c->connecting = true;
  c->connect_ms = ctimeout;
  c->keepalive = ka;
  c->addr = addr;
  c->addrlen = addrlen;
  return submit(env, r, c);
}

/* stop(id): ends a relayed connection (drain, closeAll); a no-op for one already reported. */
static napi_value js_stop(napi_env env, napi_callback_info info) {
  struct relay *r;
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, (void **)&r);
  uint32_t id;
  if (argc < 1 || napi_get_value_uint32(env, argv[0], &id) != napi_ok) {
    napi_throw_type_error(env, NULL, "stop(id)");
    return NULL;
  }
  if (!r->started) return NULL;
  struct cmd *cmd = calloc(1, sizeof *cmd);
  if (!cmd) {
    napi_throw_error(env, NULL, "out of memory");
    return NULL;
  }
  cmd->kind = CMD_STOP;
  cmd->id = id;
  push_cmd(r, cmd);
  return NULL;
}

/* ---- accepting listeners ------------------------------------------------------------------ */

static struct listener *find_listener(struct relay *r, uint32_t id) {
  struct listener *l = r->listeners;
  while (l && l->id != id) l = l->next;
  return l;
}

static bool push_listener_cmd(napi_env env, struct relay *r, enum cmd_kind kind, struct listener *l) {
  struct cmd *cmd = calloc(1, sizeof *cmd);
  if (!cmd) {
    napi_throw_error(env, NULL, "out of memory");
    return false;
  }
  cmd->kind = kind;
  cmd->lst = l;
  push_cmd(r, cmd);
  return true;
}

/* Reads a listener id argument; NULL (TypeError thrown) when it names no listener. */
static struct listener *listener_arg(napi_env env, struct relay *r, napi_value v, const char *usage) {
  uint32_t id;
  struct listener *l = napi_get_value_uint32(env, v, &id) == napi_ok ? find_listener(r, id) : NULL;
  if (!l) napi_throw_type_error(env, NULL, usage);
  return l;
}

/* helloCapBytes, helloTimeoutMs, maxConnections: for connections accepted from now on. */
static void set_limits(struct listener *l, const uint32_t lim[3]) {
  __atomic_store_n(&l->hello_cap, lim[0], __ATOMIC_RELAXED);
  __atomic_store_n(&l->hello_timeout_ms, lim[1], __ATOMIC_RELAXED);
  __atomic_store_n(&l->max_conns, lim[2], __ATOMIC_RELAXED);
}

static bool listener_limits(napi_env env, napi_value *argv, uint32_t out[3]) {
  for (int i = 0; i < 3; i++) {
    if (napi_get_value_uint32(env, argv[i], &out[i]) != napi_ok) return false;
  }
  return true;
}

/* listen(fd, helloCapBytes, helloTimeoutMs, maxConnections, wildcard) -> listenerId.
 * The relay accepts on a dup of fd; the caller closes its own listening handle. */
static napi_value js_listen(napi_env env, napi_callback_info info) {
  struct relay *r;
  size_t argc = 5;
  napi_value argv[5];
  napi_get_cb_info(env, info, &argc, argv, NULL, (void **)&r);
  static const char usage[] = "listen(fd, helloCapBytes, helloTimeoutMs, maxConnections, wildcard)";
  int64_t fd;
  uint32_t lim[3];
  bool wildcard = false;
  if (argc < 5 || get_int(env, argv[0], &fd) || fd < 0 || fd > INT32_MAX || !listener_limits(env, argv + 1, lim) ||
      napi_get_value_bool(env, argv[4], &wildcard) != napi_ok) {
    napi_throw_type_error(env, NULL, usage);
    return NULL;
  }
  if (!r->on_done || !r->on_hello) {
    napi_throw_error(env, NULL, "relay not initialised for accepting");
    return NULL;
  }
  if (!ensure_loop(env, r)) return NULL;
  struct listener *l = calloc(1, sizeof *l);
  if (!l) {
    napi_throw_error(env, NULL, "out of memory");
    return NULL;
  }
  l->fd = fcntl((int)fd, F_DUPFD_CLOEXEC, 0);
  if (l->fd < 0) {
    free(l);
    return throw_errno(env, "listen: dup");
  }
  int fl = fcntl(l->fd, F_GETFL);
  if (fl >= 0) fcntl(l->fd, F_SETFL, fl | O_NONBLOCK);
  l->wildcard = wildcard;
  set_limits(l, lim);
  l->side = (struct side){ NULL, l, 2 };
  l->owner = r;
  l->id = ++r->next_lid;
  l->next = r->listeners;
  r->listeners = l;
  if (!push_listener_cmd(env, r, CMD_LISTEN, l)) return NULL;
  /* An accepting listener keeps the process alive, as Node's own listening handle did. */
  relay_ref(r);
  napi_value id;
  napi_create_uint32(env, l->id, &id);
  return id;
}

/* configureListener(listenerId, helloCapBytes, helloTimeoutMs, maxConnections): new limits for
 * connections accepted from now on. */
static napi_value js_configure_listener(napi_env env, napi_callback_info info) {
  struct relay *r;
  size_t argc = 4;
  napi_value argv[4];
  napi_get_cb_info(env, info, &argc, argv, NULL, (void **)&r);
  static const char usage[] = "configureListener(listenerId, helloCapBytes, helloTimeoutMs, maxConnections)";
  uint32_t lim[3];
  if (argc < 4) {
    napi_throw_type_error(env, NULL, usage);
    return NULL;
  }
  struct listener *l = listener_arg(env, r, argv[0], usage);
  if (!l) return NULL;
  if (!listener_limits(env, argv + 1, lim)) {
    napi_throw_type_error(env, NULL, usage);
    return NULL;
  }
  set_limits(l, lim);
  return NULL;
}

/* listenerStats(listenerId) -> [open, refusedSinceLastCall] */
static napi_value js_listener_stats(napi_env env, napi_callback_info info) {
  struct relay *r;
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, (void **)&r);
  struct listener *l = argc < 1 ? NULL : listener_arg(env, r, argv[0], "listenerStats(listenerId)");
  if (!l) return NULL;
  napi_value out, open, refused;
  napi_create_array_with_length(env, 2, &out);
  napi_create_uint32(env, load32(&l->open), &open);
  napi_create_uint32(env, __atomic_exchange_n(&l->refused, 0, __ATOMIC_RELAXED), &refused);
  napi_set_element(env, out, 0, open);
  napi_set_element(env, out, 1, refused);
  return out;
}

/* unlisten(listenerId, wantFd) -> fd | -1: stops accepting. With wantFd, a dup of the listening
 * socket is returned first (for Node to accept on again). Accepted connections go on. */
static napi_value js_unlisten(napi_env env, napi_callback_info info) {
  struct relay *r;
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, (void **)&r);
  static const char usage[] = "unlisten(listenerId, wantFd)";
  bool want = false;
  struct listener *l = argc < 2 ? NULL : listener_arg(env, r, argv[0], usage);
  if (!l) return NULL;
  if (napi_get_value_bool(env, argv[1], &want) != napi_ok) {
    napi_throw_type_error(env, NULL, usage);
    return NULL;
  }
  int fd = -1;
  /* The relay (or its thread) closes its dup only on the command below, so the dup here is safe. */
  if (want && l->fd >= 0) fd = fcntl(l->fd, F_DUPFD_CLOEXEC, 0);
  if (want && fd < 0) return throw_errno(env, "unlisten: dup");
  if (l->owner != r) {
    if (!worker_cmd(r, CMD_UNLISTEN, l)) {
      if (fd >= 0) close(fd);
      napi_throw_error(env, NULL, "out of memory");
      return NULL;
    }
    relay_unref(r);
    napi_value out;
    napi_create_int32(env, fd, &out);
    return out;
  }
  struct cmd *cmd = calloc(1, sizeof *cmd);
  if (!cmd) {
    if (fd >= 0) close(fd);
    napi_throw_error(env, NULL, "out of memory");
    return NULL;
  }
  cmd->kind = CMD_UNLISTEN;
  cmd->lst = l;
  push_cmd(r, cmd);
  relay_unref(r);
  napi_value out;
  napi_create_int32(env, fd, &out);
  return out;
}

/* closeListenerConnections(listenerId): ends every connection the relay holds from it; those JS
 * started report "stopped", those still in their hello stage just close. */
static napi_value js_close_listener_connections(napi_env env, napi_callback_info info) {
  struct relay *r;
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, (void **)&r);
  struct listener *l = argc < 1 ? NULL : listener_arg(env, r, argv[0], "closeListenerConnections(listenerId)");
  if (!l) return NULL;
  /* Its connections may be on both: those JS decided on here, the rest on the thread. */
  if (r->worker && !worker_cmd(r, CMD_CLOSE_LISTENER, l)) {
    napi_throw_error(env, NULL, "out of memory");
    return NULL;
  }
  push_listener_cmd(env, r, CMD_CLOSE_LISTENER, l);
  return NULL;
}

/* release(listenerId): an adopted connection closed; it no longer counts against the limit. */
static napi_value js_release(napi_env env, napi_callback_info info) {
  struct relay *r;
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, (void **)&r);
  struct listener *l = argc < 1 ? NULL : listener_arg(env, r, argv[0], "release(listenerId)");
  if (!l) return NULL;
  uint32_t n = load32(&l->open);
  while (n > 0 && !__atomic_compare_exchange_n(&l->open, &n, n - 1, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
  return NULL;
}

/* The accepted connection `argv[0]` names, taken out of the awaiting table; NULL with a TypeError. */
static struct conn *awaiting_arg(napi_env env, struct relay *r, size_t argc, napi_value *argv, const char *usage) {
  uint32_t id;
  struct conn *c = argc >= 1 && napi_get_value_uint32(env, argv[0], &id) == napi_ok ? awaiting_take(r, id) : NULL;
  if (!c) napi_throw_type_error(env, NULL, usage);
  return c;
}

/* more(id): read on and report again (the bytes so far did not decide). */
static napi_value js_more(napi_env env, napi_callback_info info) {
  struct relay *r;
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, (void **)&r);
  struct conn *c = awaiting_arg(env, r, argc, argv, "more(id): no connection awaiting a decision");
  if (!c) return NULL;
  struct cmd *cmd = calloc(1, sizeof *cmd);
  if (!cmd) {
    awaiting_put(r, c);
    napi_throw_error(env, NULL, "out of memory");
    return NULL;
  }
  cmd->kind = CMD_MORE;
  cmd->conn = c;
  push_cmd(r, cmd);
  return NULL;
}

/* adopt(id) -> fd: the descriptor is JS's now (the bytes read were reported); the connection
 * still counts against its listener until release(). */
static napi_value js_adopt(napi_env env, napi_callback_info info) {
  struct relay *r;
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, (void **)&r);
  struct conn *c = awaiting_arg(env, r, argc, argv, "adopt(id): no connection awaiting a decision");
  if (!c) return NULL;
  int fd = c->fd[0];
  /* Node polls it from now on; the relay must not hear of it again. */
  epoll_ctl(r->ep, EPOLL_CTL_DEL, fd, NULL);
  c->fd[0] = -1;
  c->lst = NULL; /* counted until release() */
  free_conn_fds(r, c);
  free(c);
  napi_value out;
  napi_create_int32(env, fd, &out);
  return out;
}

/* closeAccepted(id): closes an accepted connection JS refused without a word to the client. */
static napi_value js_close_accepted(napi_env env, napi_callback_info info) {
  struct relay *r;
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, (void **)&r);
  struct conn *c = awaiting_arg(env, r, argc, argv, "closeAccepted(id): no connection awaiting a decision");
  if (!c) return NULL;
  free_conn_fds(r, c);
  free(c);
  return NULL;
}

/*
 * acceptedConnect(id, ip, port, connectTimeoutMs, idleTimeoutMs, prefix, keepalive) -> id: dial
 * and relay an accepted connection; `prefix` (a PROXY header, or empty) then every byte read from
 * the client go to the upstream first. Reports as connect() does. On a throw the connection is
 * closed.
 */
static napi_value js_accepted_connect(napi_env env, napi_callback_info info) {
  struct relay *r;
  size_t argc = 7;
  napi_value argv[7];
  napi_get_cb_info(env, info, &argc, argv, NULL, (void **)&r);
  static const char usage[] = "acceptedConnect(id, ip, port, connectTimeoutMs, idleTimeoutMs, prefix, keepalive)";
  int64_t port, ctimeout, idle, ka;
  bool is_buf = false;
  char ip[64];
  size_t iplen = 0;
  if (argc < 7 || napi_get_value_string_utf8(env, argv[1], ip, sizeof ip, &iplen) != napi_ok ||
      get_int(env, argv[2], &port) || get_int(env, argv[3], &ctimeout) || get_int(env, argv[4], &idle) ||
      napi_is_buffer(env, argv[5], &is_buf) != napi_ok || !is_buf || get_int(env, argv[6], &ka) || !keepalive_valid(ka) ||
      port <= 0 || port > 65535 || ctimeout <= 0 || idle < 0 || iplen >= sizeof ip - 1) {
    napi_throw_type_error(env, NULL, usage);
    return NULL;
  }
  struct sockaddr_storage addr;
  socklen_t addrlen;
  if (!parse_address(ip, port, &addr, &addrlen)) {
    napi_throw_type_error(env, NULL, "acceptedConnect: not an IPv4 or IPv6 address");
    return NULL;
  }
  struct conn *c = awaiting_arg(env, r, argc, argv, "acceptedConnect(id): no connection awaiting a decision");
  if (!c) return NULL;
  void *data = NULL;
  size_t plen = 0;
  napi_get_buffer_info(env, argv[5], &data, &plen);
  /* The head: prefix, then the bytes read in the hello stage (that buffer itself when no prefix). */
  if (plen > 0) {
    uint8_t *h = malloc(plen + c->hello_len);
    if (!h) {
      free_conn_fds(r, c);
      free(c);
      napi_throw_error(env, NULL, "out of memory");
      return NULL;
    }
    memcpy(h, data, plen);
    if (c->hello_len) memcpy(h + plen, c->hello, c->hello_len);
    free(c->hello);
    c->hello = h;
    c->hello_len += plen;
  }
  uint8_t *head = c->hello;
  size_t len = c->hello_len;
  c->hello = NULL;
  c->hello_len = c->hello_alloc = 0;
  if (!make_pipe(r, &c->d2u) || !make_pipe(r, &c->u2d)) {
    int saved = errno;
    free(head);
    free_conn_fds(r, c);
    free(c);
    errno = saved;
    return throw_errno(env, "acceptedConnect setup");
  }
  if (len == 0) {
    free(head);
    head = NULL;
  }
  c->hello_stage = false;
  c->awaiting = false;
  c->d2u.head = head;
  c->d2u.head_len = len;
  c->idle_ms = idle;
  c->connecting = true;
  c->connect_ms = ctimeout;
  c->keepalive = ka;
  c->addr = addr;
  c->addrlen = addrlen;
  return submit(env, r, c);
}

/* ---- learned routes ---------------------------------------------------------------------- */

/* setFast(onFast, records: Float64Array, slots: Int32Array): where learned routes report and count. */
static napi_value js_set_fast(napi_env env, napi_callback_info info) {
  struct relay *r;
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, (void **)&r);
  static const char usage[] = "setFast(onFast, records: Float64Array, slots: Int32Array)";
  napi_valuetype t;
  bool is_ta = false, is_ta2 = false;
  napi_typedarray_type t1, t2;
  size_t n1 = 0, n2 = 0;
  void *d1 = NULL, *d2 = NULL;
  if (argc < 3 || napi_typeof(env, argv[0], &t) != napi_ok || t != napi_function ||
      napi_is_typedarray(env, argv[1], &is_ta) != napi_ok || !is_ta || napi_is_typedarray(env, argv[2], &is_ta2) != napi_ok || !is_ta2 ||
      napi_get_typedarray_info(env, argv[1], &t1, &n1, &d1, NULL, NULL) != napi_ok || t1 != napi_float64_array ||
      napi_get_typedarray_info(env, argv[2], &t2, &n2, &d2, NULL, NULL) != napi_ok || t2 != napi_int32_array ||
      n1 < FAST_STRIDE) {
    napi_throw_type_error(env, NULL, usage);
    return NULL;
  }
  if (r->on_fast) {
    napi_throw_error(env, NULL, "setFast: already set");
    return NULL;
  }
  napi_create_reference(env, argv[0], 1, &r->on_fast);
  napi_create_reference(env, argv[1], 1, &r->fast_buf_ref);
  napi_create_reference(env, argv[2], 1, &r->slots_ref);
  r->fast_buf = d1;
  r->fast_buf_recs = n1 / FAST_STRIDE;
  r->slots = d2;
  r->nslots = n2;
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  r->rng = ((uint64_t)ts.tv_nsec << 20) ^ (uint64_t)ts.tv_sec ^ ((uint64_t)getpid() << 40) ^ 0x9E3779B97F4A7C15ULL;
  if (r->rng == 0) r->rng = 1;
  return NULL;
}

static bool element_number(napi_env env, napi_value arr, uint32_t i, double *out) {
  napi_value v;
  return napi_get_element(env, arr, i, &v) == napi_ok && napi_get_value_double(env, v, out) == napi_ok;
}

/* One target of a route spec: [weight, policy, clusterSlot, maxConns, connectMs, idleMs, hosts,
 * keepalive] with hosts [[ip, port, weight, slot], ...] and keepalive as keepalive_valid reads it. */
static bool parse_target(napi_env env, napi_value spec, struct fast_route *rt, uint32_t i) {
  double w, pol, slot, max, cms, ims, ka;
  napi_value hosts;
  uint32_t n = 0;
  if (!element_number(env, spec, 0, &w) || !element_number(env, spec, 1, &pol) || !element_number(env, spec, 2, &slot) ||
      !element_number(env, spec, 3, &max) || !element_number(env, spec, 4, &cms) || !element_number(env, spec, 5, &ims) ||
      napi_get_element(env, spec, 6, &hosts) != napi_ok || napi_get_array_length(env, hosts, &n) != napi_ok ||
      !element_number(env, spec, 7, &ka) || ka != ka || ka < -1 || ka > 0x7fffffffffLL || !keepalive_valid((int64_t)ka) ||
      pol < 0 || pol > 2 || slot < 0 || cms < 1 || ims < 0 || n == 0 || n > 65536) {
    return false;
  }
  struct fast_cluster *c = &rt->clusters[i];
  rt->weight[i] = w;
  c->policy = (int)pol;
  c->slot = (uint32_t)slot;
  c->max_conns = max < 0 ? -1 : (int64_t)max;
  c->connect_ms = (uint32_t)cms;
  c->idle_ms = (uint32_t)ims;
  c->keepalive = (int64_t)ka;
  c->hosts = calloc(n, sizeof *c->hosts);
  c->weight = calloc(n, sizeof *c->weight);
  c->cum = calloc(n, sizeof *c->cum);
  c->cur = calloc(n, sizeof *c->cur);
  if (!c->hosts || !c->weight || !c->cum || !c->cur) return false;
  c->n = n;
  for (uint32_t k = 0; k < n; k++) {
    napi_value h, ipv;
    char ip[64];
    size_t iplen = 0;
    double port, hw, hs;
    if (napi_get_element(env, hosts, k, &h) != napi_ok || napi_get_element(env, h, 0, &ipv) != napi_ok ||
        napi_get_value_string_utf8(env, ipv, ip, sizeof ip, &iplen) != napi_ok || iplen >= sizeof ip - 1 ||
        !element_number(env, h, 1, &port) || !element_number(env, h, 2, &hw) || !element_number(env, h, 3, &hs) ||
        port < 1 || port > 65535 || hs < 0 ||
        !parse_address(ip, (int64_t)port, &c->hosts[k].addr, &c->hosts[k].addrlen)) {
      return false;
    }
    c->hosts[k].weight = hw;
    c->hosts[k].slot = (uint32_t)hs;
  }
  fast_cluster_ready(c);
  return true;
}

/* fastLearn(listenerId, sni | null, maxHelloBytes, log, routeId, targets) -> -1 when not learned
 * (the listener's table is full), else how many connections the route it replaced for the SNI
 * started (0: none replaced). */
static napi_value js_fast_learn(napi_env env, napi_callback_info info) {
  struct relay *r;
  size_t argc = 6;
  napi_value argv[6];
  napi_get_cb_info(env, info, &argc, argv, NULL, (void **)&r);
  static const char usage[] = "fastLearn(listenerId, sni, maxHelloBytes, log, routeId, targets)";
  if (argc < 6) {
    napi_throw_type_error(env, NULL, usage);
    return NULL;
  }
  struct listener *l = listener_arg(env, r, argv[0], usage);
  if (!l) return NULL;
  char sni[256];
  size_t sni_len = 0;
  napi_valuetype t;
  int64_t max_hello, rid;
  bool log = false;
  uint32_t n = 0;
  napi_typeof(env, argv[1], &t);
  if ((t != napi_null && (napi_get_value_string_latin1(env, argv[1], sni, sizeof sni, &sni_len) != napi_ok || sni_len > 253)) ||
      get_int(env, argv[2], &max_hello) || max_hello < 0 || napi_get_value_bool(env, argv[3], &log) != napi_ok ||
      get_int(env, argv[4], &rid) || rid < 0 || rid > UINT32_MAX ||
      napi_get_array_length(env, argv[5], &n) != napi_ok || n == 0 || n > 1024 || !r->on_fast) {
    napi_throw_type_error(env, NULL, usage);
    return NULL;
  }
  struct fast_route *rt = fast_route_new((uint32_t)rid, n);
  if (!rt) {
    napi_throw_error(env, NULL, "out of memory");
    return NULL;
  }
  rt->refs = 1;
  for (uint32_t i = 0; i < n; i++) {
    napi_value spec;
    if (napi_get_element(env, argv[5], i, &spec) != napi_ok || !parse_target(env, spec, rt, i)) {
      fast_route_unref(rt);
      napi_throw_type_error(env, NULL, "fastLearn: a target is not [weight, policy, clusterSlot, maxConns, connectMs, idleMs, [[ip, port, weight, slot], ...], keepalive]");
      return NULL;
    }
    rt->total += rt->weight[i];
  }
  pthread_mutex_lock(&r->fast_lock);
  if (!l->fast && !(l->fast = calloc(1, sizeof *l->fast))) {
    fast_route_unref(rt);
    pthread_mutex_unlock(&r->fast_lock);
    napi_throw_error(env, NULL, "out of memory");
    return NULL;
  }
  l->fast->max_hello = (size_t)max_hello;
  l->fast->log = log;
  uint32_t replaced_started = 0;
  bool ok = fast_learn(l->fast, t == napi_null ? NULL : sni, t == napi_null ? -1 : (int)sni_len, rt, &replaced_started);
  fast_route_unref(rt);
  pthread_mutex_unlock(&r->fast_lock);
  /* A listener with learned routes accepts on the relay thread from now on (it stays there). A
   * wake-up of Node's loop that already reported it only accepts once more here. */
  if (ok && l->owner == r && !l->closed && ensure_worker(env, r)) {
    l->owner = r->worker;
    l->paused = false;
    if (worker_cmd(r, CMD_LISTEN, l)) epoll_ctl(r->ep, EPOLL_CTL_DEL, l->fd, NULL);
    else l->owner = r;
  }
  napi_value out;
  napi_create_double(env, ok ? (double)replaced_started : -1, &out);
  return out;
}

/* fastForget(listenerId) -> [routeId, started, ...]: the listener's learned routes go (connections
 * on them go on), each with how many connections it started, as JS must hear of them all. */
static napi_value js_fast_forget(napi_env env, napi_callback_info info) {
  struct relay *r;
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, (void **)&r);
  struct listener *l = argc < 1 ? NULL : listener_arg(env, r, argv[0], "fastForget(listenerId)");
  if (!l) return NULL;
  pthread_mutex_lock(&r->fast_lock);
  struct fast_table *t = l->fast;
  l->fast = NULL;
  /* Read under the lock: no pick can count on a route once its table is gone. */
  size_t n = 0;
  double *pairs = t && t->count ? malloc(2 * t->count * sizeof *pairs) : NULL;
  if (pairs) {
    for (int b = 0; b < FAST_BUCKETS; b++) {
      for (struct fast_entry *e = t->buckets[b]; e && n < 2 * (size_t)t->count; e = e->next) {
        pairs[n++] = e->route->id;
        pairs[n++] = e->route->started;
      }
    }
  }
  fast_table_free(t);
  pthread_mutex_unlock(&r->fast_lock);
  napi_value out, v;
  napi_create_array_with_length(env, n, &out);
  for (size_t i = 0; i < n; i++) {
    napi_create_double(env, pairs[i], &v);
    napi_set_element(env, out, (uint32_t)i, v);
  }
  free(pairs);
  return out;
}

/* setKeepalive(fd, keepalive) -> whether every option took: TCP keep-alive on a socket Node
 * dialled, as the cluster asks (Node's own setKeepAlive also sets interval and probes). */
static napi_value js_set_keepalive(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int64_t fd, ka;
  if (argc < 2 || get_int(env, argv[0], &fd) || get_int(env, argv[1], &ka) || fd < 0 || fd > INT32_MAX || !keepalive_valid(ka)) {
    napi_throw_type_error(env, NULL, "setKeepalive(fd, keepalive)");
    return NULL;
  }
  napi_value out;
  napi_get_boolean(env, set_keepalive((int)fd, ka), &out);
  return out;
}

/* keepaliveOf(fd) -> [SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT] as the kernel has
 * them (-1 where it would not say): what setKeepalive and the relay's dials set, read back. */
static napi_value js_keepalive_of(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int64_t fd;
  if (argc < 1 || get_int(env, argv[0], &fd) || fd < 0 || fd > INT32_MAX) {
    napi_throw_type_error(env, NULL, "keepaliveOf(fd)");
    return NULL;
  }
  static const int opts[4][2] = { { SOL_SOCKET, SO_KEEPALIVE }, { IPPROTO_TCP, TCP_KEEPIDLE }, { IPPROTO_TCP, TCP_KEEPINTVL }, { IPPROTO_TCP, TCP_KEEPCNT } };
  napi_value out, v;
  napi_create_array_with_length(env, 4, &out);
  for (uint32_t i = 0; i < 4; i++) {
    int val = 0;
    socklen_t len = sizeof val;
    if (getsockopt((int)fd, opts[i][0], opts[i][1], &val, &len) != 0) val = -1;
    napi_create_int32(env, val, &v);
    napi_set_element(env, out, i, v);
  }
  return out;
}

/* busy() -> whether the relay thread still holds connections, commands or records JS has not had
 * (a shutdown that just closed every connection waits for their last records). */
static napi_value js_busy(napi_env env, napi_callback_info info) {
  struct relay *r;
  napi_get_cb_info(env, info, NULL, NULL, NULL, (void **)&r);
  bool busy = false;
  struct relay *w = r->worker;
  if (w) {
    pthread_mutex_lock(&w->lock);
    busy = w->cmds != NULL || w->handoffs != NULL;
    pthread_mutex_unlock(&w->lock);
    busy = busy || __atomic_load_n(&w->active, __ATOMIC_RELAXED) > 0 || __atomic_load_n(&r->undelivered, __ATOMIC_RELAXED) > 0;
  }
  napi_value out;
  napi_get_boolean(env, busy, &out);
  return out;
}

/* scanHello(bytes, maxBytes) -> [kind ('need-more' | 'tls' | 'other'), sni, alpn (latin1), ech]:
 * the relay's ClientHello reader on its own, for tests that hold it to client-hello.ts. */
static napi_value js_scan_hello(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  bool is_buf = false;
  void *data = NULL;
  size_t len = 0;
  int64_t max;
  if (argc < 2 || napi_is_buffer(env, argv[0], &is_buf) != napi_ok || !is_buf || napi_get_buffer_info(env, argv[0], &data, &len) != napi_ok ||
      get_int(env, argv[1], &max)) {
    napi_throw_type_error(env, NULL, "scanHello(bytes, maxBytes)");
    return NULL;
  }
  struct hello_cursor cur = { 0 };
  struct hello_info hi;
  enum hello_kind k = hello_scan(data, len, max > 0 ? (size_t)max : 0, &cur, &hi);
  static const char *const KINDS[] = { "need-more", "tls", "other" };
  napi_value out, v[4];
  napi_create_array_with_length(env, 4, &out);
  napi_create_string_utf8(env, KINDS[k], NAPI_AUTO_LENGTH, &v[0]);
  napi_get_undefined(env, &v[1]);
  napi_get_undefined(env, &v[2]);
  napi_get_boolean(env, false, &v[3]);
  if (k == HELLO_TLS) {
    if (hi.sni_len >= 0) napi_create_string_latin1(env, hi.sni, (size_t)hi.sni_len, &v[1]);
    napi_create_string_latin1(env, (const char *)hi.alpn, hi.alpn_len, &v[2]);
    napi_get_boolean(env, hi.ech, &v[3]);
  }
  for (uint32_t i = 0; i < 4; i++) napi_set_element(env, out, i, v[i]);
  return out;
}

static void cleanup(void *arg);

/* init(onDone): onDone(id, downRead, upWritten, upRead, downWritten, reason) once per connection,
 * plus once with reason "connected" (not an end) when a connect() connection reached its upstream. */
static napi_value js_init(napi_env env, napi_callback_info info) {
  struct relay *r;
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, (void **)&r);
  napi_valuetype t, t2 = napi_undefined;
  if (argc < 1 || napi_typeof(env, argv[0], &t) != napi_ok || t != napi_function ||
      (argc >= 2 && (napi_typeof(env, argv[1], &t2) != napi_ok || (t2 != napi_function && t2 != napi_undefined)))) {
    napi_throw_type_error(env, NULL, "init(onDone, onHello?, helloBuffer?)");
    return NULL;
  }
  if (r->on_done) {
    napi_throw_error(env, NULL, "relay already initialised");
    return NULL;
  }
  /* The reports run as callbacks of one async resource (async hooks see them as such). */
  napi_value name, resource;
  napi_create_string_utf8(env, "tlsgate-relay", NAPI_AUTO_LENGTH, &name);
  napi_create_object(env, &resource);
  if (napi_async_init(env, resource, name, &r->async) != napi_ok ||
      napi_create_reference(env, resource, 1, &r->resource) != napi_ok ||
      napi_create_reference(env, argv[0], 1, &r->on_done) != napi_ok) {
    napi_throw_error(env, NULL, "cannot create the relay callback");
    return NULL;
  }
  if (t2 == napi_function) napi_create_reference(env, argv[1], 1, &r->on_hello);
  bool is_buf = false;
  if (argc >= 3 && napi_is_buffer(env, argv[2], &is_buf) == napi_ok && is_buf) {
    void *data = NULL;
    size_t len = 0;
    if (napi_get_buffer_info(env, argv[2], &data, &len) == napi_ok && napi_create_reference(env, argv[2], 1, &r->scratch_ref) == napi_ok) {
      r->scratch = data;
      r->scratch_len = len;
    }
  }
  return NULL;
}

/* A connection the relay (or its thread) still holds at teardown: closed and freed. */
static void drop_conn(struct relay *r, struct conn *c) {
  fast_route_unref(c->froute);
  free_conn_fds(r, c);
  free(c);
}

static void drop_list(struct relay *r, struct conn *c) {
  while (c) {
    struct conn *n = c->qnext;
    drop_conn(r, c);
    c = n;
  }
}

/* Stops the relay thread and drops what it held (before the listeners go: its connections point
 * at them). */
static void stop_worker(struct relay *m) {
  struct relay *w = m->worker;
  if (!w) return;
  __atomic_store_n(&w->stopping, true, __ATOMIC_RELEASE);
  uint64_t one = 1;
  while (write(w->wake_fd, &one, sizeof one) < 0 && errno == EINTR) {}
  pthread_join(w->thread, NULL);
  uv_close((uv_handle_t *)m->wake_async, free_handle);
  m->wake_async = NULL;
  while (w->ready) {
    struct conn *q = w->ready;
    w->ready = q->qnext;
    if (q->closed) free(q);
  }
  while (w->dead) {
    struct conn *q = w->dead;
    w->dead = q->qnext;
    free(q);
  }
  for (struct conn *c = w->all; c;) {
    struct conn *n = c->next;
    drop_conn(w, c);
    c = n;
  }
  drop_list(w, w->hpend);
  drop_list(w, w->handoffs);
  drop_list(m, m->inbound);
  m->inbound = NULL;
  while (w->cmds) {
    struct cmd *c = w->cmds;
    w->cmds = c->next;
    free(c);
  }
  close_fd(&w->ep);
  close_fd(&w->wake_fd);
  drain_pipe_pool(w);
  pthread_mutex_destroy(&w->lock);
  free(w->recs);
  free(w->outbox);
  free(w);
  m->worker = NULL;
}

/* Environment teardown: the handles stop (and are freed once closed), then whatever the relay
 * still held is dropped. */
static void cleanup(void *arg) {
  struct relay *r = arg;
  stop_worker(r);
  if (r->started) {
    uv_poll_stop(r->poll);
    uv_timer_stop(r->timer);
    uv_close((uv_handle_t *)r->poll, free_handle);
    uv_close((uv_handle_t *)r->timer, free_handle);
    /* Closed connections still on the ready queue are on no other list; live ones are on r->all. */
    while (r->ready) {
      struct conn *q = r->ready;
      r->ready = q->qnext;
      if (q->closed) free(q);
    }
    for (struct conn *c = r->all; c;) {
      struct conn *n = c->next;
      fast_route_unref(c->froute);
      free_conn_fds(r, c);
      free(c);
      c = n;
    }
    while (r->cmds) {
      struct cmd *c = r->cmds;
      r->cmds = c->next;
      if (c->kind == CMD_START || c->kind == CMD_MORE) {
        free_conn_fds(r, c->conn);
        free(c->conn);
      }
      free(c);
    }
    while (r->results) {
      struct result *res = r->results;
      r->results = res->next;
      if (res->reason == HELLO) {
        free_conn_fds(r, res->conn);
        free(res->conn);
      }
      free(res);
    }
    for (int b = 0; b < HASH_BUCKETS; b++) {
      while (r->awaiting[b]) {
        struct conn *c = r->awaiting[b];
        r->awaiting[b] = c->hnext;
        free_conn_fds(r, c);
        free(c);
      }
    }
    close_fd(&r->ep);
  }
  while (r->listeners) {
    struct listener *l = r->listeners;
    r->listeners = l->next;
    fast_table_free(l->fast);
    close_fd(&l->fd);
    free(l);
  }
  drain_pipe_pool(r);
  free(r->recs);
  free(r->xrecs);
  pthread_mutex_destroy(&r->fast_lock);
  free(r);
}

static napi_value init_module(napi_env env, napi_value exports) {
  struct relay *r = calloc(1, sizeof *r);
  if (!r) return exports;
  r->ep = -1;
  r->next_deadline = -1;
  r->pool_due = -1;
  r->fast_due = -1;
  r->timer_due = -1;
  r->env = env;
  r->wake_fd = -1;
  pthread_mutex_init(&r->fast_lock, NULL);
  /* TLSGATE_RELAY_THREAD=0 keeps learned routes on Node's loop (measurements, a fallback). */
  const char *thr = getenv("TLSGATE_RELAY_THREAD");
  r->threads_ok = !(thr && strcmp(thr, "0") == 0);
  /* The record layout JS must read with (native-relay.ts checks it before using learned routes). */
  napi_value stride;
  napi_create_uint32(env, FAST_STRIDE, &stride);
  napi_property_descriptor props[] = {
    { "init", NULL, js_init, NULL, NULL, NULL, napi_enumerable, r },
    { "start", NULL, js_start, NULL, NULL, NULL, napi_enumerable, r },
    { "connect", NULL, js_connect, NULL, NULL, NULL, napi_enumerable, r },
    { "stop", NULL, js_stop, NULL, NULL, NULL, napi_enumerable, r },
    { "listen", NULL, js_listen, NULL, NULL, NULL, napi_enumerable, r },
    { "configureListener", NULL, js_configure_listener, NULL, NULL, NULL, napi_enumerable, r },
    { "listenerStats", NULL, js_listener_stats, NULL, NULL, NULL, napi_enumerable, r },
    { "unlisten", NULL, js_unlisten, NULL, NULL, NULL, napi_enumerable, r },
    { "closeListenerConnections", NULL, js_close_listener_connections, NULL, NULL, NULL, napi_enumerable, r },
    { "release", NULL, js_release, NULL, NULL, NULL, napi_enumerable, r },
    { "more", NULL, js_more, NULL, NULL, NULL, napi_enumerable, r },
    { "adopt", NULL, js_adopt, NULL, NULL, NULL, napi_enumerable, r },
    { "closeAccepted", NULL, js_close_accepted, NULL, NULL, NULL, napi_enumerable, r },
    { "acceptedConnect", NULL, js_accepted_connect, NULL, NULL, NULL, napi_enumerable, r },
    { "setFast", NULL, js_set_fast, NULL, NULL, NULL, napi_enumerable, r },
    { "fastLearn", NULL, js_fast_learn, NULL, NULL, NULL, napi_enumerable, r },
    { "fastForget", NULL, js_fast_forget, NULL, NULL, NULL, napi_enumerable, r },
    { "scanHello", NULL, js_scan_hello, NULL, NULL, NULL, napi_enumerable, r },
    { "busy", NULL, js_busy, NULL, NULL, NULL, napi_enumerable, r },
    { "setKeepalive", NULL, js_set_keepalive, NULL, NULL, NULL, napi_enumerable, r },
    { "keepaliveOf", NULL, js_keepalive_of, NULL, NULL, NULL, napi_enumerable, r },
    { "fastStride", NULL, NULL, NULL, NULL, stride, napi_enumerable, r },
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  napi_add_env_cleanup_hook(env, cleanup, r);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init_module)
