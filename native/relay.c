/*
 * tlsgate's optional native TCP relay: moves bytes between two connected TCP sockets with
 * splice(2) (socket -> pipe -> socket), so payload never enters user space or the JS heap.
 *
 * One relay thread per Node environment, with its own epoll set, serves every relayed
 * connection. JS hands over a pair of sockets it no longer reads or writes; the addon dup()s
 * both descriptors (a socket JS closes or destroys can never turn into a recycled fd number
 * here), and reports back exactly once per connection through a thread-safe function: the bytes
 * each side read and wrote, and why it ended. JS keeps its own sockets open until then and
 * closes them on that report.
 *
 * Semantics match the JS relay: backpressure (a side is not read while its pipe still holds
 * bytes the other side has not taken), EOF forwarded as a half-close once the pipe is drained,
 * the connection done when both directions are done, an error or reset on either side ends it,
 * and an idle timeout over both directions. Only N-API (node_api.h) is used: no V8 ABI.
 *
 * connect() is the cheaper variant for a plain TCP upstream: JS hands over only the downstream
 * descriptor, the address to dial and the bytes it already read (ClientHello, PROXY header); the
 * relay thread opens the upstream socket itself, so Node never builds a socket object for it.
 * It reports once when the connect succeeded ("connected"), then the usual final report; a
 * connect that fails or times out is itself the final report.
 */
#define _GNU_SOURCE
#include <node_api.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <time.h>
#include <unistd.h>

/* Work done for one connection per wake-up before others get their turn (fairness). */
#define PUMP_BUDGET_BYTES (1u << 20)
#define MAX_EVENTS 256
#define HASH_BUCKETS 4096
/* The longest the thread sleeps between idle scans when nothing is due sooner. */
#define MAX_WAIT_MS 60000

enum reason {
  END_OK = 0, END_DOWN_RESET, END_UP_RESET, END_IDLE, END_STOPPED, END_INTERNAL, END_CONNECT_FAILED, END_CONNECT_TIMEOUT,
  CONNECTED /* not an end: the progress report of connect() */
};
static const char *const REASONS[] = {
  "ok", "downstream_reset", "upstream_reset", "idle_timeout", "stopped", "internal_error", "upstream_connect_failed",
  "upstream_connect_timeout", "connected",
};
/* TCP keepalive on sockets the relay dials, as tlsgate's JS dialer sets it. */
#define KEEPALIVE_IDLE_S 60

struct conn;

/* What an epoll event points at: one side of one connection (or, with conn NULL, the wake fd). */
struct side {
  struct conn *conn;
  int which; /* 0 downstream, 1 upstream */
};

/* One direction: src socket -> pipe -> dst socket. */
struct dir {
  int src, dst;
  int pr, pw;
  size_t cap;      /* pipe capacity in bytes */
  size_t inpipe;   /* bytes spliced in, not yet out */
  uint64_t in, out; /* bytes read from src / written to dst */
  bool eof, done;
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
  bool closed, queued;
  struct conn *hnext;       /* hash chain */
  struct conn *prev, *next; /* all live connections */
  struct conn *qnext;       /* ready queue (budget ran out) or dead list */
};

struct result {
  uint32_t id;
  int reason;
  uint64_t down_read, up_written, up_read, down_written;
};

struct cmd {
  int kind; /* 0 start, 1 stop */
  struct conn *conn;
  uint32_t id;
  struct cmd *next;
};

struct relay {
  napi_threadsafe_function tsfn;
  bool thread_started, quit;
  pthread_t thread;
  int ep, wake;
  pthread_mutex_t mu;
  struct cmd *cmds, *cmds_tail;
  uint32_t next_id;
  uint32_t active; /* main thread only: started and not yet reported */
  /* relay-thread state */
  struct conn *buckets[HASH_BUCKETS];
  struct conn *all;
  struct conn *ready, *dead;
  int64_t next_deadline; /* -1: none */
};

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void close_fd(int *fd) {
  if (*fd >= 0) close(*fd);
  *fd = -1;
}

/* Releases what a connection holds besides its struct: descriptors and the unsent head. */
static void free_conn_fds(struct conn *c) {
  free(c->d2u.head);
  c->d2u.head = NULL;
  c->d2u.head_len = c->d2u.head_off = 0;
  close_fd(&c->fd[0]);
  close_fd(&c->fd[1]);
  close_fd(&c->d2u.pr);
  close_fd(&c->d2u.pw);
  close_fd(&c->u2d.pr);
  close_fd(&c->u2d.pw);
}

/* ---- relay thread ------------------------------------------------------------------------ */

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

/* Queues a report for JS: the final one, or CONNECTED (not an end). A failed malloc drops it. */
static void report(struct relay *r, struct conn *c, int reason) {
  struct result *res = malloc(sizeof *res);
  if (!res) return;
  res->id = c->id;
  res->reason = reason;
  res->down_read = c->d2u.in;
  res->up_written = c->d2u.out;
  res->up_read = c->u2d.in;
  res->down_written = c->u2d.out;
  if (napi_call_threadsafe_function(r->tsfn, res, napi_tsfn_nonblocking) != napi_ok) free(res);
}

/* Ends a connection: out of epoll, descriptors closed, one report to JS. Freed after the batch. */
static void finish(struct relay *r, struct conn *c, int reason) {
  if (c->closed) return;
  c->closed = true;
  for (int i = 0; i < 2; i++) {
    /* JS still holds the same open file description, so closing our dup alone would not take
     * it out of the epoll set: remove it explicitly. */
    if (c->fd[i] >= 0) epoll_ctl(r->ep, EPOLL_CTL_DEL, c->fd[i], NULL);
  }
  free_conn_fds(c);
  hash_remove(r, c);
  if (c->prev) c->prev->next = c->next; else if (r->all == c) r->all = c->next;
  if (c->next) c->next->prev = c->prev;
  c->prev = c->next = NULL;
  report(r, c, reason);
  if (!c->queued) {
    c->qnext = r->dead;
    r->dead = c;
  }
  /* A queued connection is unlinked and freed when the ready queue reaches it. */
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
    if (!d->eof && d->inpipe < d->cap) {
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
      } else if (errno != EAGAIN && errno != EINTR) {
        finish(r, c, src_reason);
        return -1;
      }
    }
    if (d->head_off < d->head_len) {
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
      } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
        finish(r, c, dst_reason);
        return -1;
      }
    }
    if (d->inpipe > 0 && d->head_len == 0) {
      ssize_t n = splice(d->pr, NULL, d->dst, NULL, d->inpipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
      if (n > 0) {
        d->inpipe -= (size_t)n;
        d->out += (uint64_t)n;
        moved += n;
        progress = true;
      } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
        finish(r, c, dst_reason);
        return -1;
      }
    }
    if (d->eof && d->inpipe == 0 && d->head_len == 0 && !d->done) {
      /* Forward the FIN; the other direction keeps going (half-close). A peer that is already
       * gone makes this fail, and the other direction's own I/O reports that. */
      shutdown(d->dst, SHUT_WR);
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

static void check_error(struct relay *r, struct side *s) {
  struct conn *c = s->conn;
  int err = 0;
  socklen_t len = sizeof err;
  if (getsockopt(c->fd[s->which], SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err != 0) {
    finish(r, c, s->which == 0 ? END_DOWN_RESET : c->connecting ? END_CONNECT_FAILED : END_UP_RESET);
  }
}

static void note_deadline(struct relay *r, int64_t due) {
  if (r->next_deadline < 0 || due < r->next_deadline) r->next_deadline = due;
}

/* The upstream is connected: tell JS, start the idle clock, and relay (the head goes first). */
static void connected(struct relay *r, struct conn *c) {
  c->connecting = false;
  c->last_ms = now_ms();
  if (c->idle_ms > 0) note_deadline(r, c->last_ms + c->idle_ms);
  report(r, c, CONNECTED);
  pump(r, c);
}

/* An event on a connection still dialling: only the upstream's outcome matters (and a downstream
 * error, which ends it); downstream bytes wait in its socket until the relay starts. */
static void connect_event(struct relay *r, struct side *s, uint32_t ev) {
  struct conn *c = s->conn;
  if (s->which == 0) {
    if (ev & EPOLLERR) check_error(r, s);
    return;
  }
  int err = 0;
  socklen_t len = sizeof err;
  if (getsockopt(c->fd[1], SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
  if (err != 0 || (!(ev & EPOLLOUT) && (ev & (EPOLLERR | EPOLLHUP)))) finish(r, c, END_CONNECT_FAILED);
  else if (ev & EPOLLOUT) connected(r, c);
}

/* Opens and dials the upstream socket: 0 connected at once, 1 under way, -1 failed. */
static int start_connect(struct conn *c) {
  int fd = socket(c->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
  if (fd < 0) return -1;
  c->fd[1] = fd;
  c->d2u.dst = fd;
  c->u2d.src = fd;
  int one = 1, idle = KEEPALIVE_IDLE_S;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
  if (connect(fd, (struct sockaddr *)&c->addr, c->addrlen) == 0) return 0;
  return errno == EINPROGRESS || errno == EINTR ? 1 : -1;
}

static void add_conn(struct relay *r, struct conn *c) {
  c->last_ms = now_ms();
  c->hnext = r->buckets[c->id % HASH_BUCKETS];
  r->buckets[c->id % HASH_BUCKETS] = c;
  c->prev = NULL;
  c->next = r->all;
  if (r->all) r->all->prev = c;
  r->all = c;
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
  for (int i = 0; i < 2; i++) {
    struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT | EPOLLET, .data.ptr = &c->sides[i] };
    if (epoll_ctl(r->ep, EPOLL_CTL_ADD, c->fd[i], &ev) != 0) {
      finish(r, c, END_INTERNAL);
      return;
    }
  }
  if (!c->connecting) pump(r, c);
  else if (dial == 0) connected(r, c);
}

static void run_commands(struct relay *r) {
  uint64_t v;
  while (read(r->wake, &v, sizeof v) > 0) {}
  pthread_mutex_lock(&r->mu);
  struct cmd *list = r->cmds;
  r->cmds = r->cmds_tail = NULL;
  pthread_mutex_unlock(&r->mu);
  while (list) {
    struct cmd *next = list->next;
    if (list->kind == 0) {
      add_conn(r, list->conn);
    } else {
      struct conn *c = hash_find(r, list->id);
      if (c) finish(r, c, END_STOPPED);
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
    if (c->connecting) {
      if (c->connect_due <= now) finish(r, c, END_CONNECT_TIMEOUT);
      else if (next < 0 || c->connect_due < next) next = c->connect_due;
    } else if (c->idle_ms > 0) {
      int64_t due = c->last_ms + c->idle_ms;
      if (due <= now) finish(r, c, END_IDLE);
      else if (next < 0 || due < next) next = due;
    }
    c = n;
  }
  r->next_deadline = next;
}

static void *relay_main(void *arg) {
  struct relay *r = arg;
  struct epoll_event evs[MAX_EVENTS];
  for (;;) {
    int timeout = -1;
    if (r->ready) {
      timeout = 0;
    } else if (r->next_deadline >= 0) {
      int64_t left = r->next_deadline - now_ms();
      timeout = left < 0 ? 0 : left > MAX_WAIT_MS ? MAX_WAIT_MS : (int)left;
    }
    int n = epoll_wait(r->ep, evs, MAX_EVENTS, timeout);
    if (n < 0 && errno != EINTR) n = 0;
    for (int i = 0; i < n; i++) {
      struct side *s = evs[i].data.ptr;
      if (!s) {
        run_commands(r);
        continue;
      }
      if (s->conn->closed) continue;
      if (s->conn->connecting) {
        connect_event(r, s, evs[i].events);
        continue;
      }
      if (evs[i].events & EPOLLERR) check_error(r, s);
      pump(r, s->conn);
    }
    /* Connections whose budget ran out: another turn each, after everyone else's events. */
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
    while (r->dead) {
      struct conn *d = r->dead;
      r->dead = d->qnext;
      free(d);
    }
    pthread_mutex_lock(&r->mu);
    bool quit = r->quit;
    pthread_mutex_unlock(&r->mu);
    if (quit) break;
  }
  return NULL;
}

/* ---- main thread ------------------------------------------------------------------------- */

static void call_js(napi_env env, napi_value cb, void *context, void *data) {
  struct relay *r = context;
  struct result *res = data;
  if (env != NULL && cb != NULL) {
    if (res->reason != CONNECTED && r->active > 0 && --r->active == 0) napi_unref_threadsafe_function(env, r->tsfn);
    napi_value argv[6], undef;
    napi_create_uint32(env, res->id, &argv[0]);
    napi_create_double(env, (double)res->down_read, &argv[1]);
    napi_create_double(env, (double)res->up_written, &argv[2]);
    napi_create_double(env, (double)res->up_read, &argv[3]);
    napi_create_double(env, (double)res->down_written, &argv[4]);
    napi_create_string_utf8(env, REASONS[res->reason], NAPI_AUTO_LENGTH, &argv[5]);
    napi_get_undefined(env, &undef);
    napi_call_function(env, undef, cb, 6, argv, NULL);
  }
  free(res);
}

static void push_cmd(struct relay *r, struct cmd *c) {
  c->next = NULL;
  pthread_mutex_lock(&r->mu);
  if (r->cmds_tail) r->cmds_tail->next = c; else r->cmds = c;
  r->cmds_tail = c;
  pthread_mutex_unlock(&r->mu);
  uint64_t one = 1;
  ssize_t w = write(r->wake, &one, sizeof one);
  (void)w; /* EAGAIN only when the counter is saturated: the thread is awake anyway */
}

static napi_value throw_errno(napi_env env, const char *what) {
  char msg[160];
  snprintf(msg, sizeof msg, "%s: %s", what, strerror(errno));
  napi_throw_error(env, NULL, msg);
  return NULL;
}

static bool ensure_thread(napi_env env, struct relay *r) {
  if (r->thread_started) return true;
  r->ep = epoll_create1(EPOLL_CLOEXEC);
  if (r->ep < 0) return throw_errno(env, "epoll_create1"), false;
  r->wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (r->wake < 0) {
    close_fd(&r->ep);
    return throw_errno(env, "eventfd"), false;
  }
  struct epoll_event ev = { .events = EPOLLIN, .data.ptr = NULL };
  epoll_ctl(r->ep, EPOLL_CTL_ADD, r->wake, &ev);
  /* Signals belong to Node's main thread; this thread never takes one. */
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  int rc = pthread_create(&r->thread, NULL, relay_main, r);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (rc != 0) {
    close_fd(&r->wake);
    close_fd(&r->ep);
    errno = rc;
    return throw_errno(env, "pthread_create"), false;
  }
  r->thread_started = true;
  return true;
}

static int get_int(napi_env env, napi_value v, int64_t *out) {
  return napi_get_value_int64(env, v, out) == napi_ok ? 0 : -1;
}

static bool make_pipe(struct dir *d) {
  int p[2];
  if (pipe2(p, O_NONBLOCK | O_CLOEXEC) != 0) return false;
  d->pr = p[0];
  d->pw = p[1];
  int cap = fcntl(p[0], F_GETPIPE_SZ);
  d->cap = cap > 0 ? (size_t)cap : 65536;
  return true;
}

/*
 * A connection for the relay thread: the downstream dup, pipes, an id. upFd < 0: connect() dials
 * the upstream later, on the relay thread. NULL (with a JS exception pending) when setup failed:
 * nothing is left open.
 */
static struct conn *new_conn(napi_env env, struct relay *r, int64_t down, int64_t up, int64_t idle) {
  if (!r->tsfn) {
    napi_throw_error(env, NULL, "relay not initialised");
    return NULL;
  }
  if (!ensure_thread(env, r)) return NULL;
  struct conn *c = calloc(1, sizeof *c);
  if (!c) {
    napi_throw_error(env, NULL, "out of memory");
    return NULL;
  }
  c->fd[0] = c->fd[1] = c->d2u.pr = c->d2u.pw = c->u2d.pr = c->u2d.pw = -1;
  c->fd[0] = fcntl((int)down, F_DUPFD_CLOEXEC, 0);
  if (up >= 0) c->fd[1] = fcntl((int)up, F_DUPFD_CLOEXEC, 0);
  if (c->fd[0] < 0 || (up >= 0 && c->fd[1] < 0) || !make_pipe(&c->d2u) || !make_pipe(&c->u2d)) {
    int saved = errno;
    free_conn_fds(c);
    free(c);
    errno = saved;
    throw_errno(env, "relay setup");
    return NULL;
  }
  c->id = ++r->next_id;
  if (c->id == 0) c->id = ++r->next_id;
  c->d2u.src = c->fd[0];
  c->d2u.dst = c->fd[1];
  c->u2d.src = c->fd[1];
  c->u2d.dst = c->fd[0];
  c->idle_ms = idle;
  c->sides[0] = (struct side){ c, 0 };
  c->sides[1] = (struct side){ c, 1 };
  return c;
}

/* Hands a set-up connection to the relay thread; returns its id (or NULL, nothing started). */
static napi_value submit(napi_env env, struct relay *r, struct conn *c) {
  struct cmd *cmd = malloc(sizeof *cmd);
  if (!cmd) {
    free_conn_fds(c);
    free(c);
    napi_throw_error(env, NULL, "out of memory");
    return NULL;
  }
  cmd->kind = 0;
  cmd->conn = c;
  /* While connections are relayed, the pending report keeps the process alive, as an open
   * socket would; with none, the relay never holds the event loop. */
  if (r->active++ == 0) napi_ref_threadsafe_function(env, r->tsfn);
  /* Once pushed, `c` belongs to the relay thread, which may finish and free it at once (a peer
   * that already reset): nothing of it is read here after push_cmd. */
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

/* connect(downFd, ip, port, connectTimeoutMs, idleTimeoutMs, downEof, head) -> id */
static napi_value js_connect(napi_env env, napi_callback_info info) {
  struct relay *r;
  size_t argc = 7;
  napi_value argv[7];
  napi_get_cb_info(env, info, &argc, argv, NULL, (void **)&r);
  static const char usage[] = "connect(downFd, ip, port, connectTimeoutMs, idleTimeoutMs, downEof, head)";
  int64_t down, port, ctimeout, idle;
  bool down_eof = false, is_buf = false;
  char ip[64];
  size_t iplen = 0;
  if (argc < 7 || get_int(env, argv[0], &down) || napi_get_value_string_utf8(env, argv[1], ip, sizeof ip, &iplen) != napi_ok ||
      get_int(env, argv[2], &port) || get_int(env, argv[3], &ctimeout) || get_int(env, argv[4], &idle) ||
      napi_get_value_bool(env, argv[5], &down_eof) != napi_ok || napi_is_buffer(env, argv[6], &is_buf) != napi_ok || !is_buf ||
      down < 0 || down > INT32_MAX || port <= 0 || port > 65535 || ctimeout <= 0 || idle < 0 || iplen >= sizeof ip - 1) {
    napi_throw_type_error(env, NULL, usage);
    return NULL;
  }
  struct sockaddr_storage addr;
  socklen_t addrlen;
  memset(&addr, 0, sizeof addr);
  struct sockaddr_in *a4 = (struct sockaddr_in *)&addr;
  struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&addr;
  if (inet_pton(AF_INET, ip, &a4->sin_addr) == 1) {
    a4->sin_family = AF_INET;
    a4->sin_port = htons((uint16_t)port);
    addrlen = sizeof *a4;
  } else if (inet_pton(AF_INET6, ip, &a6->sin6_addr) == 1) {
    a6->sin6_family = AF_INET6;
    a6->sin6_port = htons((uint16_t)port);
    addrlen = sizeof *a6;
  } else {
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
  if (!r->thread_started) return NULL;
  struct cmd *cmd = malloc(sizeof *cmd);
  if (!cmd) {
    napi_throw_error(env, NULL, "out of memory");
    return NULL;
  }
  cmd->kind = 1;
  cmd->id = id;
  push_cmd(r, cmd);
  return NULL;
}

static void cleanup(void *arg);

/* init(onDone): onDone(id, downRead, upWritten, upRead, downWritten, reason) once per connection,
 * plus once with reason "connected" (not an end) when a connect() connection reached its upstream. */
static napi_value js_init(napi_env env, napi_callback_info info) {
  struct relay *r;
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, (void **)&r);
  napi_valuetype t;
  if (argc < 1 || napi_typeof(env, argv[0], &t) != napi_ok || t != napi_function) {
    napi_throw_type_error(env, NULL, "init(onDone)");
    return NULL;
  }
  if (r->tsfn) {
    napi_throw_error(env, NULL, "relay already initialised");
    return NULL;
  }
  napi_value name;
  napi_create_string_utf8(env, "tlsgate-relay", NAPI_AUTO_LENGTH, &name);
  if (napi_create_threadsafe_function(env, argv[0], NULL, name, 0, 1, NULL, NULL, r, call_js, &r->tsfn) != napi_ok) {
    napi_throw_error(env, NULL, "cannot create the relay callback");
    return NULL;
  }
  napi_unref_threadsafe_function(env, r->tsfn);
  /* Cleanup hooks run last-added first: re-adding ours after the thread-safe function was
   * created makes it run before that function's own teardown, so the relay thread is joined
   * while the function it reports through still exists. */
  napi_remove_env_cleanup_hook(env, cleanup, r);
  napi_add_env_cleanup_hook(env, cleanup, r);
  return NULL;
}

/* Environment teardown: stop the thread, then drop whatever it still held. */
static void cleanup(void *arg) {
  struct relay *r = arg;
  if (r->thread_started) {
    pthread_mutex_lock(&r->mu);
    r->quit = true;
    pthread_mutex_unlock(&r->mu);
    uint64_t one = 1;
    ssize_t w = write(r->wake, &one, sizeof one);
    (void)w;
    pthread_join(r->thread, NULL);
    /* Closed connections still on the ready queue are on no other list; live ones are on r->all. */
    while (r->ready) {
      struct conn *q = r->ready;
      r->ready = q->qnext;
      if (q->closed) free(q);
    }
    for (struct conn *c = r->all; c;) {
      struct conn *n = c->next;
      free_conn_fds(c);
      free(c);
      c = n;
    }
    while (r->cmds) {
      struct cmd *c = r->cmds;
      r->cmds = c->next;
      if (c->kind == 0) {
        free_conn_fds(c->conn);
        free(c->conn);
      }
      free(c);
    }
    close_fd(&r->wake);
    close_fd(&r->ep);
  }
  pthread_mutex_destroy(&r->mu);
  free(r);
}

static napi_value init_module(napi_env env, napi_value exports) {
  struct relay *r = calloc(1, sizeof *r);
  if (!r) return exports;
  r->ep = r->wake = -1;
  r->next_deadline = -1;
  pthread_mutex_init(&r->mu, NULL);
  napi_property_descriptor props[] = {
    { "init", NULL, js_init, NULL, NULL, NULL, napi_enumerable, r },
    { "start", NULL, js_start, NULL, NULL, NULL, napi_enumerable, r },
    { "connect", NULL, js_connect, NULL, NULL, NULL, napi_enumerable, r },
    { "stop", NULL, js_stop, NULL, NULL, NULL, napi_enumerable, r },
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  napi_add_env_cleanup_hook(env, cleanup, r);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init_module)
