/*
 * Routes the relay applies by itself to connections it accepted: for a listener, the SNIs JS
 * already routed to a plain TCP proxy, each with that chain's weighted clusters and their
 * endpoints. A connection whose ClientHello names one of them is dialled and relayed without a
 * call into JS; what JS accounts per connection (counters, the access log) reaches it in batches.
 *
 * The picks follow src/runtime/upstream/load-balancer.ts and tcp-proxy.ts's pickWeighted. Active
 * counts (LEAST_REQUEST, maxConnections) are not copies: they are the slots of one Int32Array
 * that JS's cluster manager also counts in, so both sides see every connection. The round-robin
 * position is the relay's own, as each Envoy worker keeps its own.
 */
#ifndef TLSGATE_FAST_ROUTE_H
#define TLSGATE_FAST_ROUTE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

enum lb_policy { LB_ROUND_ROBIN = 0, LB_LEAST_REQUEST, LB_RANDOM };

struct fast_host {
  struct sockaddr_storage addr;
  socklen_t addrlen;
  double weight; /* as configured; effective weights are in the cluster */
  uint32_t slot;
};

struct fast_cluster {
  int policy;
  uint32_t slot;      /* the cluster's active connections */
  int64_t max_conns;  /* -1: no limit */
  uint32_t connect_ms, idle_ms;
  int64_t keepalive; /* -1: none; else as keepalive_valid in relay.c reads it */
  uint32_t n;
  struct fast_host *hosts;
  double *weight, *cum, *cur; /* effective weights, running sums, smooth round-robin state */
  double total;
  bool uniform;
  uint32_t rr_next;
};

/* One learned route: JS's id for it, the targets (cluster weights), refcounted by the table
 * entry and by every connection on it. `started` counts the connections it was picked for (each
 * reports a START record): once the table lets go, JS knows how many records are still to come. */
struct fast_route {
  uint32_t id;
  uint32_t refs;
  uint32_t started;
  uint32_t n;
  double *weight;
  double total;
  struct fast_cluster *clusters;
};

struct fast_pick {
  uint32_t target, host;
};

/* Sets up a cluster's effective weights once its hosts are filled in. */
void fast_cluster_ready(struct fast_cluster *c);
/* A target and an endpoint for a new connection; false when JS must decide (no weight, no host,
 * the cluster at its limit, a slot out of range). Counts nothing. Called under the relay's
 * fast_lock: the round-robin state is shared by both of its threads. */
bool fast_pick(struct fast_route *rt, const int32_t *slots, size_t nslots, uint64_t *rng, struct fast_pick *out);
struct fast_route *fast_route_new(uint32_t id, uint32_t n);
void fast_route_unref(struct fast_route *rt);

/* A listener's learned SNIs (and "no SNI") -> route. */
#define FAST_BUCKETS 256
#define FAST_MAX_ENTRIES 4096
struct fast_entry {
  struct fast_entry *next;
  struct fast_route *route;
  int len; /* -1: the entry for a hello without SNI */
  char sni[];
};
struct fast_table {
  struct fast_entry *buckets[FAST_BUCKETS];
  uint32_t count;
  size_t max_hello; /* the listener's maxClientHelloBytes, as JS's parser is given it */
  bool log;         /* access log on: connections carry what their entries need */
};

struct fast_route *fast_lookup(const struct fast_table *t, const char *sni, int len);
/* Adds or replaces an entry (taking a reference on `rt`); false when the table is full. A route
 * replaced leaves its `started` in `*replaced_started` (else 0). */
bool fast_learn(struct fast_table *t, const char *sni, int len, struct fast_route *rt, uint32_t *replaced_started);
void fast_table_free(struct fast_table *t);

#endif
