/* router.h - the route table: which path and method go where, and who may ask.
 *
 * The router answers what needs no job itself (health, models, version, metrics, the
 * embedded web pages, every early error: unknown route, wrong method, missing key,
 * model still loading) and hands the rest to jobs.c with the parsed body. It reads the
 * daemon's state through the fields the daemon sets here and never calls the daemon.
 * Loop thread only.
 */
#ifndef KVD_SERVER_ROUTER_H
#define KVD_SERVER_ROUTER_H

#include "config.h"
#include "http.h"
#include "jobs.h"

typedef enum kvd_serve_state {
    KVD_SERVE_LOADING,
    KVD_SERVE_READY,
    KVD_SERVE_DRAINING,
    KVD_SERVE_STOPPING,
} kvd_serve_state;

typedef struct kvd_router {
    const kvd_server_config *cfg;
    kvd_serve_state state;            /* set by the daemon */
    kvd_jobs *jobs;
    const kvd_http_server *http;      /* for the connection gauge */
    const char *const *model_names;   /* the served name first, then its aliases */
    int num_model_names;
} kvd_router;

/* kvd_http_handlers' callbacks; arg is the kvd_router. */
void kvd_router_on_request(kvd_http_request *req, void *arg);
void kvd_router_on_abort(kvd_http_request *req, void *arg);

#endif
