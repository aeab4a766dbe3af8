/*
 * tests/bench/http.c - kmsd over its Unix socket, driven by the load
 * generator of load.c (32 keep-alive clients).
 *
 * bench_http: kmsd on SoftHSM2 (workers 32, sessions 32, as the shipped
 * kmsd.conf), datakeys then decrypts at 32 clients, latency quantiles of
 * the datakey run, kmsd's VmHWM afterwards.  CPU per request of each run:
 * kmsd's (its process CPU clock) plus the load generator's (this process,
 * getrusage) over the measured window, divided by the successful replies:
 * http_{datakey,decrypt}_cpu_us, split into _kmsd_cpu_us and _client_cpu_us.
 * bench_slow: kmsd whose module is libp11shim.so adding 2 ms to every token
 * call; datakey throughput at 32 clients / at 1 client.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "kmsd_harness.h"

/* ---- kmsd ---------------------------------------------------------------------- */

/* Set up and start kmsd on a new token with `module`; create key "bench". */
static int kmsd_start(kh_kmsd *k, const bench_opts *o, const char *label, const char *module)
{
    char conf[2048];
    kh_response r;
    int rc = -1;

    if (kh_setup(k, o->kmsd, label, NULL, NULL) != 0)
        goto out;
    /* The shipped kmsd.conf's [server] and [token] sizes. */
    snprintf(conf, sizeof(conf),
             "; kmsd.conf written by tests/bench/http.c\n"
             "[token]\nmodule = %s\nuri = %s\npin_file = pin\nsessions = 32\n"
             "[store]\nbackend = sqlite\npath = kms.db\n"
             "[listen]\nunix = kmsd.sock\n"
             "[server]\nthreads = %d\nworkers = 32\nqueue = 1024\n",
             module, k->tt.uri, BENCH_KMSD_LOOPS);
    if (kh_write_file(k->conf, conf, 0600) != 0 || kh_start(k) != 0)
        goto out;
    if (kh_request(k->sock, "POST", "/v1/keys", "{\"name\":\"bench\"}", 16, NULL, &r) != 0)
        goto out;
    if (r.status != 201)
        fprintf(stderr, "bench: POST /v1/keys: %ld %s\n", r.status, r.body);
    else
        rc = 0;
    kh_response_free(&r);
out:
    return rc;
}

/* http_<op>_cpu_us and its split, from run r (r->ok > 0). */
static void set_cpu(json_t *out, const char *op, const bench_load_result *r)
{
    char field[64];
    double client_us = r->cpu_self_s * 1e6 / (double)r->ok;
    double kmsd_us = r->cpu_server_s * 1e6 / (double)r->ok;

    if (r->cpu_server_s < 0) {
        fprintf(stderr, "bench: http %s: kmsd's CPU time unknown\n", op);
        return;
    }
    snprintf(field, sizeof(field), "http_%s_cpu_us", op);
    bench_set(out, field, kmsd_us + client_us);
    snprintf(field, sizeof(field), "http_%s_kmsd_cpu_us", op);
    bench_set(out, field, kmsd_us);
    snprintf(field, sizeof(field), "http_%s_client_cpu_us", op);
    bench_set(out, field, client_us);
}

int bench_http(const bench_opts *o, json_t *out)
{
    kh_kmsd k;
    bench_load *load = NULL;
    bench_load_result warm, gen, dec;
    json_t *details = json_object();
    const char *sock;
    long hwm_kb;
    int rc = -1;

    memset(&k, 0, sizeof(k));
    if (kmsd_start(&k, o, "p11kms-bench-http", o->softhsm) != 0)
        goto out;
    sock = k.sock;
    if (bench_load_new(&sock, 1, o->clients, &load) != 0)
        goto out;
    /* Warm up (connections, sessions, page cache), then measure. */
    if (bench_load_run(load, o->clients, 0, 1.0, k.pid, &warm) != 0 ||
        bench_load_run(load, o->clients, 0, o->seconds, k.pid, &gen) != 0 ||
        bench_load_run(load, o->clients, 1, o->seconds, k.pid, &dec) != 0)
        goto out;
    fprintf(stderr,
            "bench: http %d clients: datakey %.0f ops/s (p50 %.2f ms, p99 %.2f ms, %lu errors), "
            "decrypt %.0f ops/s (p99 %.2f ms, %lu errors)\n",
            o->clients, gen.ops_s, gen.p50_ms, gen.p99_ms, gen.errors, dec.ops_s, dec.p99_ms,
            dec.errors);
    hwm_kb = kh_proc_kb(k.pid, "VmHWM");
    if (gen.ok == 0 || dec.ok == 0) {
        fprintf(stderr, "bench: http: no successful requests\n");
        goto out;
    }
    fprintf(stderr,
            "bench: http CPU per request: datakey %.1f us kmsd + %.1f us clients, decrypt %.1f "
            "us kmsd + %.1f us clients\n",
            gen.cpu_server_s * 1e6 / (double)gen.ok, gen.cpu_self_s * 1e6 / (double)gen.ok,
            dec.cpu_server_s * 1e6 / (double)dec.ok, dec.cpu_self_s * 1e6 / (double)dec.ok);
    bench_set(out, "http_datakey_ops_s", gen.ops_s);
    bench_set(out, "http_decrypt_ops_s", dec.ops_s);
    bench_set(out, "http_datakey_p50_ms", gen.p50_ms);
    bench_set(out, "http_datakey_p99_ms", gen.p99_ms);
    set_cpu(out, "datakey", &gen);
    set_cpu(out, "decrypt", &dec);
    if (hwm_kb > 0)
        bench_set(out, "kmsd_rss_mib_peak", (double)hwm_kb / 1024.0);
    json_object_set_new(details, "clients", json_integer(o->clients));
    json_object_set_new(details, "datakey", bench_load_json(&gen));
    json_object_set_new(details, "decrypt", bench_load_json(&dec));
    json_object_set_new(details, "errors", json_integer((json_int_t)(gen.errors + dec.errors)));
    json_object_set(out, "http_details", details);
    rc = 0;
out:
    json_decref(details);
    bench_load_free(load);
    if (k.pid > 0 && kh_stop(&k, SIGTERM) != 0)
        fprintf(stderr, "bench: kmsd did not stop cleanly\n");
    if (k.dir[0] != '\0')
        kh_teardown(&k);
    return rc;
}

int bench_slow(const bench_opts *o, json_t *out)
{
    kh_kmsd k;
    bench_load *load = NULL;
    bench_load_result one, many;
    json_t *details = json_object();
    const char *sock;
    char delay[32];
    int rc = -1, started;

    memset(&k, 0, sizeof(k));
    /* kmsd inherits these: the shim forwards to SoftHSM2 after the delay. */
    snprintf(delay, sizeof(delay), "%d", o->slow_delay_us);
    setenv("P11SHIM_MODULE", o->softhsm, 1);
    setenv("P11SHIM_DELAY_US", delay, 1);
    started = kmsd_start(&k, o, "p11kms-bench-slow", o->shim);
    unsetenv("P11SHIM_MODULE");
    unsetenv("P11SHIM_DELAY_US");
    if (started != 0)
        goto out;
    sock = k.sock;
    if (bench_load_new(&sock, 1, o->clients, &load) != 0)
        goto out;
    if (bench_load_run(load, 1, 0, 0.5, k.pid, &one) != 0 ||
        bench_load_run(load, 1, 0, o->seconds, k.pid, &one) != 0 ||
        bench_load_run(load, o->clients, 0, o->seconds, k.pid, &many) != 0)
        goto out;
    fprintf(stderr,
            "bench: slow token (%d us per call): 1 client %.0f ops/s, %d clients %.0f ops/s\n",
            o->slow_delay_us, one.ops_s, o->clients, many.ops_s);
    if (one.ok == 0 || many.ok == 0)
        goto out;
    bench_set(out, "slow_token_scaling", many.ops_s / one.ops_s);
    json_object_set_new(details, "delay_us", json_integer(o->slow_delay_us));
    json_object_set_new(details, "one_client", bench_load_json(&one));
    json_object_set_new(details, "many_clients", bench_load_json(&many));
    json_object_set(out, "slow_token_details", details);
    rc = 0;
out:
    json_decref(details);
    bench_load_free(load);
    if (k.pid > 0 && kh_stop(&k, SIGTERM) != 0)
        fprintf(stderr, "bench: kmsd (slow token) did not stop cleanly\n");
    if (k.dir[0] != '\0')
        kh_teardown(&k);
    return rc;
}

/* --socket A[,B...]: kmsd nodes someone else started (e.g. several nodes on
 * one PostgreSQL database); key "bench" is created if missing and the
 * clients are spread round-robin over the sockets. */
int bench_external(const bench_opts *o, json_t *out)
{
    char *list = strdup(o->sockets), *save = NULL, *tok;
    const char *socks[16];
    int n_socks = 0, rc = -1;
    bench_load *load = NULL;
    bench_load_result warm, gen;
    kh_response r;

    for (tok = strtok_r(list, ",", &save); tok != NULL && n_socks < 16;
         tok = strtok_r(NULL, ",", &save))
        socks[n_socks++] = tok;
    if (n_socks == 0)
        goto out;
    if (kh_request(socks[0], "POST", "/v1/keys", "{\"name\":\"bench\"}", 16, NULL, &r) != 0)
        goto out;
    kh_response_free(&r);
    if (bench_load_new(socks, n_socks, o->clients, &load) != 0)
        goto out;
    if (bench_load_run(load, o->clients, 0, 1.0, 0, &warm) != 0 ||
        bench_load_run(load, o->clients, 0, o->seconds, 0, &gen) != 0)
        goto out;
    fprintf(stderr, "bench: external, %d node(s), %d clients: datakey %.0f ops/s (p50 %.2f ms, "
                    "p99 %.2f ms, %lu errors)\n",
            n_socks, o->clients, gen.ops_s, gen.p50_ms, gen.p99_ms, gen.errors);
    bench_set(out, "external_datakey_ops_s", gen.ops_s);
    json_object_set_new(out, "external_details", bench_load_json(&gen));
    json_object_set_new(out, "external_nodes", json_integer(n_socks));
    rc = gen.ok > 0 ? 0 : -1;
out:
    bench_load_free(load);
    free(list);
    return rc;
}
