/*
 * kms/server/metrics.h - GET /metrics of kmsd: counters kept on the
 * request path without locks, rendered in the Prometheus text format.
 *
 * kms_metrics_request is called once per answered request, on its event
 * loop (http.c finish); kms_metrics_render runs on a worker when
 * /metrics is asked for and gathers the rest (token calls from the
 * module's counters, group commit from the store, worker queue depth).
 */
#ifndef P11KMS_KMS_SERVER_METRICS_H
#define P11KMS_KMS_SERVER_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "kms/core/core.h"
#include "kms/server/routes.h"

/* Count one answered request: route is the call's name
 * ("datakey.generate"; it must live as long as the process, as the route
 * table's names do), or NULL for a request answered before it had one
 * (404, 405, 400, 401, 413 ...); status its HTTP status; us its latency. */
void kms_metrics_request(const char *route, int status, uint64_t us);

/* Gauges and counters the server knows (http.c). */
typedef struct kms_metrics_gauges {
    size_t queue_depth;    /* worker jobs queued or running */
    long inflight;         /* requests between arrival and reply */
    long connections;      /* open client connections */
    long request_timeouts; /* counter: connections closed, a request too slow */
    long accept_pauses;    /* counter: accept paused (no descriptors or memory) */
} kms_metrics_gauges;

/* Fill r with the whole exposition (status 200, text/plain; version
 * 0.0.4), or a JSON 500 when out of memory. */
void kms_metrics_render(kms_core *core, const kms_metrics_gauges *g, kms_reply *r);

#endif
