#!/usr/bin/env python3
"""tests/fuzz/make_corpus.py - (re)write the seed corpora of the fuzz targets.

Writes tests/fuzz/corpus/<target>/NNN-<what> (small, realistic inputs: valid
requests, configurations, policies, sealed values, plus a few near misses).
The sealed seeds are real sealed values under fuzz_sealed.c's fixed key
(bytes 00..1f, DEK id 0f0e0d0c-0b0a-4908-8706-050403020100, AAD "fuzz-aad"),
so they need python3-cryptography; the nonces are fixed, so reruns write
the same bytes.  Run it after changing a format; commit the result.
"""
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEK = "0f0e0d0c-0b0a-4908-8706-050403020100"
DEK2 = "5b1f3c2a-9d4e-4f6a-8b7c-0123456789ab"


def write(target, seeds):
    d = os.path.join(HERE, "corpus", target)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for i, (name, data) in enumerate(seeds):
        if isinstance(data, str):
            data = data.encode()
        with open(os.path.join(d, "%03d-%s" % (i, name)), "wb") as f:
            f.write(data)


def req(method, target, body=None, extra=""):
    head = "%s %s HTTP/1.1\r\nHost: kmsd\r\n%s" % (method, target, extra)
    if body is not None:
        head += "Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body.encode())
    return head + "\r\n" + (body or "")


BODIES = [
    ("POST", "/v1/keys", '{"name":"payments-eu"}'),
    ("POST", "/v1/keys/k1/datakeys", '{"context":{"customer":"42"}}'),
    ("POST", "/v1/keys/k1/datakeys", '{}'),
    ("POST", "/v1/datakeys/%s/decrypt" % DEK, '{"context":{"customer":"42","table":"orders"}}'),
    ("POST", "/v1/datakeys/%s/revoke" % DEK, '{"reason":"compromised"}'),
    ("POST", "/v1/datakeys/revoke", '{"key":"k1","context":{"customer":"42"},"reason":"cessation"}'),
    ("POST", "/v1/datakeys/destroy", '{"key":"k1","context":{"customer":"42"}}'),
    ("POST", "/v1/keys/k1/config", '{"min_decrypt_version":2,"rotation_period":"90d"}'),
    ("POST", "/v1/keys/k1/rewrap", '{"batch":100}'),
    ("POST", "/v1/keys/k1/rotate", None),
]


def http_seeds():
    s = []
    s.append(("health", "\x00" + req("GET", "/v1/health")))
    s.append(("health-bytewise", "\x01" + req("GET", "/v1/health")))
    s.append(("keys", "\x00" + req("GET", "/v1/keys")))
    s.append(("key-show", "\x05" + req("GET", "/v1/keys/payments-eu")))
    s.append(("dek-show", "\x00" + req("GET", "/v1/datakeys/" + DEK)))
    s.append(("dek-list", "\x00" + req("GET", "/v1/datakeys?key=k1&state=active&limit=10&cursor=" + DEK2)))
    s.append(("dek-destroy", "\x00" + req("DELETE", "/v1/datakeys/" + DEK)))
    s.append(("retire", "\x00" + req("DELETE", "/v1/keys/k1/versions/1")))
    for i, (m, t, b) in enumerate(BODIES):
        s.append(("body%d" % i, chr(i * 7 % 64) + req(m, t, b)))
    s.append(("pipelined", "\x00" + req("GET", "/v1/health") + req("POST", "/v1/keys", '{"name":"a"}')
              + req("GET", "/v1/keys/a", extra="Connection: close\r\n")))
    s.append(("http10", "\x00GET /v1/health HTTP/1.0\r\n\r\n"))
    s.append(("lf-only", "\x00GET /v1/health HTTP/1.1\nHost: k\n\n"))
    s.append(("too-large", "\x00POST /v1/keys HTTP/1.1\r\nContent-Length: 99999\r\n\r\n{}"))
    s.append(("chunked", "\x00POST /v1/keys HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"))
    s.append(("expect", "\x00POST /v1/keys HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 12\r\n\r\n{\"name\":\"a\"}"))
    s.append(("get-body", "\x00GET /v1/keys HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"))
    s.append(("bad-method", "\x00BREW /v1/health HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"))
    s.append(("folded", "\x00GET /v1/health HTTP/1.1\r\nX: a\r\n b\r\n\r\n"))
    s.append(("dup-cl", "\x00POST /v1/keys HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}"))
    s.append(("refused-hdr", "\x00GET / HTTP/1.1\r\nX-P11kms-Refused: busy\r\n\r\n"))
    s.append(("busy", "\x80" + req("GET", "/v1/health")))
    s.append(("garbage", "\x00GARBAGE\r\n\r\n"))
    s.append(("http09", "\x00GET /v1/health\r\n\r\n"))
    s.append(("query-abuse", "\x00" + req("GET", "/v1/datakeys?key=k1&key=k2&%zz=1")))
    s.append(("percent", "\x00" + req("GET", "/v1/keys/%2e%2e%2fetc")))
    s.append(("traversal", "\x00" + req("GET", "/v1/keys/../../etc/passwd")))
    s.append(("bearer", "\x00" + req("GET", "/v1/keys", extra="Authorization: Bearer abc\r\n")))
    s.append(("wrong-method", "\x00" + req("PUT", "/v1/keys/k1", "{}")))
    s.append(("unknown", "\x00" + req("GET", "/v2/keys")))
    return s


def body_seeds():
    # First byte: index into fuzz_json_body.c's targets[].
    s = []
    idx = {"/v1/keys": 0, "datakeys-gen": 1, "decrypt": 2, "revoke": 3, "bulk-revoke": 4,
           "bulk-destroy": 5, "config": 6, "rewrap": 7, "rotate": 8, "disable": 9, "enable": 10,
           "list": 11, "show": 12}
    add = lambda k, body, name: s.append((name, bytes([idx[k]]) + body.encode()))
    add("/v1/keys", '{"name":"payments-eu"}', "create")
    add("/v1/keys", '{"name":"a.b_c-9"}', "create2")
    add("/v1/keys", '{"name":"Bad Name"}', "create-bad")
    add("/v1/keys", '{"name":42}', "create-type")
    add("/v1/keys", '[]', "array")
    add("datakeys-gen", '{"context":{"customer":"42"}}', "gen")
    add("datakeys-gen", '{"context":{"a":"1","b":"2","c":"\\u00e9\\n"}}', "gen-escapes")
    add("datakeys-gen", '', "gen-empty")
    add("datakeys-gen", '{"context":null}', "gen-null")
    add("datakeys-gen", '{"context":{"x":{"y":{"z":{}}}}}', "gen-deep")
    add("datakeys-gen", '{"context":{"k":1}}', "gen-int")
    add("decrypt", '{"context":{"customer":"42","table":"orders"}}', "decrypt")
    add("decrypt", '{"context":{"customer":"42"},"extra":1}', "decrypt-unknown")
    add("revoke", '{"reason":"compromised"}', "revoke")
    add("revoke", '{"reason":"superseded"}', "revoke2")
    add("revoke", '{"reason":"bored"}', "revoke-bad")
    add("bulk-revoke", '{"key":"k1","context":{"customer":"42"},"reason":"cessation"}', "bulk-revoke")
    add("bulk-revoke", '{"key":"k1","context":{},"reason":"unspecified"}', "bulk-revoke-empty")
    add("bulk-destroy", '{"key":"k1","context":{"customer":"42"}}', "bulk-destroy")
    add("config", '{"min_decrypt_version":2}', "config-min")
    add("config", '{"rotation_period":"90d"}', "config-period")
    add("config", '{"min_decrypt_version":1,"rotation_period":"12h"}', "config-both")
    add("config", '{"min_decrypt_version":-1}', "config-neg")
    add("config", '{"rotation_period":"0"}', "config-off")
    add("rewrap", '{"batch":100}', "rewrap")
    add("rewrap", '{"batch":1.5}', "rewrap-real")
    add("rewrap", '', "rewrap-all")
    add("rotate", '{}', "rotate")
    add("disable", '', "disable")
    add("enable", '{"x":1}', "enable-unknown")
    add("list", 'key=k1', "list")
    add("list", 'key=k1&state=revoked&limit=500&cursor=' + DEK2, "list-all")
    add("list", 'key=k%31&state=active', "list-pct")
    add("list", 'key=k1&key=k2', "list-dup")
    add("list", 'limit=0', "list-nokey")
    add("show", 'anything=1', "show-query")
    return s


def context_seeds():
    return [(n, b) for n, b in [
        ("empty", "{}"), ("null", "null"), ("one", '{"customer":"42"}'),
        ("two", '{"table":"orders","customer":"42"}'),
        ("escapes", '{"q\\"uote":"back\\\\slash","ctl":"\\u0001\\u001f\\n\\t"}'),
        ("utf8", '{"name":"J\\u00fcrgen","city":"\u6771\u4eac"}'),
        ("surrogate", '{"emoji":"\\ud83d\\ude00"}'),
        ("emptyval", '{"a":""}'), ("emptyname", '{"":"x"}'),
        ("nested", '{"a":{"b":"c"}}'), ("number", '{"a":1}'), ("array", '["a"]'),
        ("string", '"x"'), ("order", '{"b":"1","a":"2","ab":"3","aa":"4","B":"5"}'),
        ("prefix", '{"a":"1","a\\u0000":"2"}'), ("slash", '{"a/b":"\\/"}'),
        ("del", '{"\\u007f":"\\u0080"}'),
        ("many", "{" + ",".join('"k%02d":"v"' % i for i in range(32)) + "}"),
        ("toomany", "{" + ",".join('"k%02d":"v"' % i for i in range(33)) + "}"),
        ("longname", '{"' + "n" * 128 + '":"v"}'), ("longername", '{"' + "n" * 129 + '":"v"}'),
        ("longvalue", '{"a":"' + "v" * 1024 + '"}'),
        ("big", "{" + ",".join('"k%02d":"%s"' % (i, "x" * 300) for i in range(30)) + "}"),
        ("ws", ' { "a" : "b" , "c" : "d" } '),
    ]]


CONF = """[token]
module   = /usr/lib/softhsm/libsofthsm2.so
uri      = pkcs11:token=p11kms-dev
sessions = 32
[store]
backend  = sqlite
path     = kms.db
[listen]
unix     = kmsd.sock
unix_mode = 0600
[server]
threads  = 2
workers  = 32
queue    = 1024
max_body = 65536
timeout  = 30
max_connections = 1024
"""


def config_seeds():
    s = [("full", CONF)]
    s.append(("minimal", "[token]\nmodule=softhsm2\nuri=pkcs11:\n[store]\npath=a.db\n[listen]\nunix=/tmp/k.sock\n"))
    s.append(("comments", "; a comment\n# another\n" + CONF.replace("= 32\n", "= 32 ; trailing\n")))
    s.append(("uri-hash", CONF.replace("pkcs11:token=p11kms-dev", "pkcs11:token=a%20b;object=x#y;slot-id=1")))
    s.append(("uri-bad", CONF.replace("pkcs11:token=p11kms-dev", "http://x")))
    s.append(("postgres", CONF.replace("backend  = sqlite\npath     = kms.db", "backend=postgres\nurl=postgresql://kms@db/kms")))
    s.append(("tls", CONF + "[listen]\n"))
    s.append(("tls2", CONF.replace("unix_mode = 0600", "unix_mode = 0600\ntls = 127.0.0.1:8443\ntls_cert = c.pem\ntls_key = k.pem\ntls_client_ca = ca.pem")))
    s.append(("tls6", "[::1]:8443\n" + CONF))
    s.append(("policy", CONF + "[policy]\nfile = policy.conf\n"))
    s.append(("pin", CONF.replace("sessions = 32", "pin_file = /etc/hostname\nsessions = 32")))
    s.append(("softhsm", CONF.replace("sessions = 32", "softhsm2_conf = softhsm2.conf\nsessions = 32")))
    s.append(("dup-key", CONF + "[server]\nthreads=3\n"))
    s.append(("dup-key2", CONF.replace("threads  = 2", "threads = 2\nthreads = 3")))
    s.append(("unknown-key", CONF.replace("threads  = 2", "thread = 2")))
    s.append(("unknown-section", "[tokens]\n"))
    s.append(("bad-int", CONF.replace("workers  = 32", "workers = 32x")))
    s.append(("range", CONF.replace("workers  = 32", "workers = 99999")))
    s.append(("mode", CONF.replace("0600", "0999")))
    s.append(("empty-value", CONF.replace("queue    = 1024", "queue =")))
    s.append(("no-section", "module = x\n"))
    s.append(("bad-header", "[token\n"))
    s.append(("crlf", CONF.replace("\n", "\r\n")))
    s.append(("nul", CONF.replace("threads  = 2", "threads = 2\x00junk")))
    s.append(("rotation", CONF + "rotation_check_interval = 60\nmax_wraps_per_version = 1000\n"))
    s.append(("long-unix", CONF.replace("kmsd.sock", "s" * 200 + ".sock")))
    s.append(("empty", ""))
    return s


def policy_seeds():
    s = []
    with open(os.path.join(HERE, "..", "..", "conf", "policy.conf")) as f:
        s.append(("example", f.read()))
    tok = "sha256:" + "ab" * 32
    for n, t in [
        ("allow-uid", "allow uid:1000 generate,decrypt on k1 app-*\n"),
        ("allow-all", "allow uid:* all on *\n"),
        ("group", "allow group:27 admin on *\n"),
        ("cert", 'allow "cert:Payroll Batch" decrypt on payroll\n'),
        ("cert-glob", "allow cert:app-* generate on web-[a-z]?\n"),
        ("token", "token ci " + tok + "\nallow token:ci admin on ci-*\n"),
        ("token-glob", "token a " + tok + "\nallow token:* decrypt on *\n"),
        ("dup-token", "token a " + tok + "\ntoken a " + tok + "\n"),
        ("comments", "# c\n\n   # indented\nallow uid:0 all on *  # trailing\n"),
        ("bad-op", "allow uid:1 fly on *\n"),
        ("bad-principal", "allow bob admin on *\n"),
        ("no-on", "allow uid:1 admin *\n"),
        ("bad-hash", "token x sha256:zz\n"),
        ("unknown", "deny uid:1 admin on *\n"),
        ("quotes", 'allow "cert:a \\"b\\"" admin on "k 1"\n'),
        ("crlf", "allow uid:1 admin on *\r\nallow uid:2 decrypt on k?\r\n"),
        ("many", "".join("allow uid:%d generate on k%d-*\n" % (i, i) for i in range(50))),
        ("class", "allow uid:5 all on [!a-c]*x\n"),
        ("nul", "allow uid:1 admin on *\x00\n"),
        ("empty", ""),
    ]:
        s.append((n, t))
    return s


def sealed_seeds():
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        sys.exit("make_corpus.py: python3-cryptography is needed for the sealed seeds")
    key = bytes(range(32))
    aad = b"fuzz-aad"
    s = []
    for i, pt in enumerate([b"", b"a", b"hello, world", b'{"card":"4111111111111111"}',
                            bytes(range(256)), b"x" * 1000]):
        nonce = bytes([i + 1] * 12)
        header = b"P11S\x01\x24" + DEK.encode() + nonce
        ct = AESGCM(key).encrypt(nonce, pt, header + aad)
        s.append(("sealed%d" % i, b"\x00" + header + ct))
        # near misses: other magic, version, id length, id, truncated
        if i == 2:
            v = header + ct
            s.append(("bad-magic", b"\x00P11X" + v[4:]))
            s.append(("bad-version", b"\x00" + v[:4] + b"\x02" + v[5:]))
            s.append(("bad-idlen", b"\x00" + v[:5] + b"\x23" + v[6:]))
            s.append(("other-id", b"\x00" + v[:6] + DEK2.encode() + v[42:]))
            s.append(("upper-id", b"\x00" + v[:6] + DEK.upper().encode() + v[42:]))
            s.append(("truncated", b"\x00" + v[:69]))
            s.append(("flipped-tag", b"\x00" + v[:-1] + bytes([v[-1] ^ 1])))
    for i, (aad_len, pt) in enumerate([(0, b""), (3, b"abcsecret"), (8, b"customer-42 record"),
                                       (1, b"\x00\x01\x02"), (20, b"y" * 200)]):
        s.append(("roundtrip%d" % i, b"\x01" + bytes([aad_len]) + pt))
    return s


def main():
    write("fuzz_http_request", http_seeds())
    write("fuzz_json_body", body_seeds())
    write("fuzz_context", context_seeds())
    write("fuzz_config", config_seeds())
    write("fuzz_policy", policy_seeds())
    write("fuzz_sealed", sealed_seeds())


if __name__ == "__main__":
    main()
