#!/usr/bin/env python3
"""jwt_issuer: a small ES256 JWT issuer that publishes its keys as a JWKS.

POST /auth/token {"name": "alice"} answers a JWT for subject "alice", signed
with ES256 (ECDSA on P-256 with SHA-256); GET /auth/jwks publishes the public
key, so that the `jwt` auth method of HashiCorp Vault or OpenBao, or anything
else that checks JWTs against a JWKS URL, can trust the tokens. The same
endpoint answers OAuth 2.0 clients (the client credentials grant, RFC 6749
§4.4) with RFC 9068 access tokens.

One module on the Python 3.9+ standard library and `cryptography`:

    python jwt_issuer.py --help

Copyright (c) 2026 the jwt-issuer authors. MIT licence: see LICENSE.
"""

# The file reads top to bottom: constants, errors, the pure core (base64url
# and JSON, keys, claims and signing with OAuth 2.0 forms and scopes,
# passwords, HTTP request heads), configuration, files, the Issuer value, the
# endpoints and their ROUTES, metrics, connections (the handler and the
# server), processes (logging, signals, workers), then the commands and main.
# Its rules:
#   - The pure core takes data and returns data: no socket, clock, file or
#     os.environ inside. The edge passes in the time and the token id.
#   - What a reload replaces is one immutable Issuer, built by load_issuer
#     and swapped in one assignment; a request reads it once.
#   - Every error a client can cause is an HTTPError, raised where the
#     problem is found; every answer's bytes come from render_answer.
#   - Signal handlers do nothing but wake a thread or a loop through a pipe
#     (and flag a stop): no lock is ever taken inside one.
#   - Nothing secret is logged or served: never a private key's "d", a
#     password or a token (the audit line names its jti).

__version__ = "1.1.0"

import argparse
import base64
import binascii
import bisect
import collections
import contextlib
import email.utils
import errno
import functools
import ipaddress
import json
import logging
import math
import mmap
import os
import re
import select
import signal
import socket
import socketserver
import ssl
import stat
import struct
import sys
import threading
import time
import unicodedata
import urllib.parse
import warnings
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from typing import NamedTuple

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

# Imported where they are used, as a server that does not use them never
# loads them (5 MB and 15 ms of start-up together): getpass (hash-password),
# hashlib and hmac (--auth-file; the stdlib's second OpenSSL), tempfile
# (writing key files), resource (the descriptor limit), cryptography's
# serialization (PEM keys).

log = logging.getLogger("jwt_issuer")


# ---------------------------------------------------------------- constants

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_KEY_PATH = "./key.json"
DEFAULT_TTL_SECONDS = 60 * 60
DEFAULT_MAX_CONNECTIONS = 256  # per process, one thread each

MAX_BODY_BYTES = 4 * 1024
MAX_NAME_CHARS = 256
MAX_REQUEST_LINE_BYTES = 8 * 1024
MAX_FIELD_LINE_BYTES = 8 * 1024
MAX_FIELDS = 100
MAX_HEAD_BYTES = 64 * 1024  # what is read of a request head at most
MAX_EMPTY_LINES = 8  # ignored before a request line
MAX_KEY_FILE_BYTES = 1024 * 1024
MAX_AUTH_FILE_BYTES = 16 * 1024 * 1024
MAX_TLS_FILE_BYTES = 1024 * 1024
MAX_CLAIMS_FILE_BYTES = 1024 * 1024
MAX_SUBJECT_CLAIMS_BYTES = 4 * 1024  # one subject's claims, "*" merged in, as JSON
MAX_CLAIM_DEPTH = 32  # how deep a claim's lists and objects may nest
READ_CHUNK_BYTES = 16 * 1024
MAX_LOGGED_LINE_CHARS = 1024  # of a request line, in the access log

IDLE_TIMEOUT_SECONDS = 10  # how long a connection may wait for its next request
REQUEST_TIMEOUT_SECONDS = 5  # from a request's first byte to its last; also a TLS handshake
WRITE_TIMEOUT_SECONDS = 10  # for writing a whole answer, however slowly the client reads
LINGER_SECONDS = 1  # after an early error answer, how long unread input is drained
LOG_WAIT_SECONDS = 1  # how long a log line waits for a full stderr before lines are dropped
DRAIN_TIMEOUT_SECONDS = 10  # on SIGTERM, how long requests in flight may take to finish
STOP_GRACE_SECONDS = 1  # while stopping, how long an idle connection may still bring a request
TICK_SECONDS = 0.25  # how often deadlines are enforced
LISTEN_BACKLOG = 128  # socketserver's 5 drops SYNs in bursts: clients retry after a whole second
SPARE_DESCRIPTORS = 32  # beside the connections: the listener, pipes, files read on reload
RESTART_DELAY_SECONDS = 1  # a worker that dies within this of its start is restarted after it

# P-256 coordinates and private scalars are 32 bytes, always written in full
# (RFC 7518 §6.2.1.2, §6.2.2.1); so are R and S in the signature (§3.4).
P256_BYTES = 32
P256 = ec.SECP256R1()
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # n, SEC 2 §2.4.2
ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())

# Passwords (--auth-file): scrypt, RFC 7914, at 16 MiB and tens of milliseconds a
# check; PBKDF2-SHA256 where this Python's hashlib has no scrypt. Settings
# below the floors are too weak, above the ceilings too costly to check (a
# hash file could otherwise ask for gigabytes and seconds per login).
SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P = 14, 8, 1
SCRYPT_FLOOR_LOG2_N = 14
SCRYPT_MAX_MEMORY_BYTES = 64 * 1024 * 1024  # 128 * r * N
SCRYPT_MAX_WORK_BYTES = 128 * 1024 * 1024  # 128 * r * N * p
PBKDF2_ITERATIONS = 600000
PBKDF2_FLOOR_ITERATIONS = 100000
PBKDF2_MAX_ITERATIONS = 2000000
PASSWORD_CHECKS_AT_ONCE = os.cpu_count() or 2  # each scrypt check holds up to 64 MiB
VERIFIED_CACHE_SECONDS = 60  # a successful check is reused this long, until any reload
VERIFIED_CACHE_ENTRIES = 1024
GUESSES_PER_USER = (10, 6)  # per client address and user: allowed, then one more per N s
GUESSES_PER_ADDRESS = (50, 1.2)  # per client address over all users: the same
REALM = "jwt-issuer"

# Claims (--claims): "*" holds everyone's; a subject's own win, member by member.
# What the issuer sets itself cannot come from the file: a file that set "iss"
# or "exp" would forge what a verifier trusts the issuer alone for.
EVERYONE = "*"
ISSUER_CLAIMS = ("iss", "sub", "aud", "exp", "nbf", "iat", "jti", "client_id")
SCOPE = "scope"  # in the file, a client's ceiling: what a token may be granted at most

# OAuth 2.0 client credentials (RFC 6749 §4.4) on the token endpoint, answered
# with RFC 9068 access tokens. A form parameter may come once (§3.2), except
# the two that name a token's audiences, which may repeat (RFC 8707 §2, RFC
# 8693 §2.1).
FORM_TYPE = "application/x-www-form-urlencoded"
CLIENT_CREDENTIALS = "client_credentials"
REPEATABLE_PARAMETERS = ("audience", "resource")

# Mozilla's "intermediate" TLS 1.2 suites: AEAD only (TLS 1.3 has no others).
TLS12_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
                 "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
                 "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
                 "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:"
                 "DHE-RSA-CHACHA20-POLY1305")

# Two-phase rotation (`rotate FILE`): a key is published PUBLISH_AHEAD before it
# signs, so that every replica serves it and every verifier's cached JWKS holds
# it first (PyJWKClient keeps keys 300 s; jose's remote key set and Dex's
# max-age 600 s); a retired key stays published for the TTL its last tokens
# live, plus the same margin (replicas still signing with it until they
# reload, verifiers' leeway past exp: Vault's is 60 s). The times are the key
# file's own members, which the JWKS never shows (RFC 7517 §4).
DEFAULT_PUBLISH_AHEAD_SECONDS = 15 * 60
ROTATION_MARGIN_SECONDS = 15 * 60  # --retire-after is the TTL plus this
PUBLISHED_AT, RETIRED_AT = "published_at", "retired_at"  # NumericDate, as JWT's
PUBLIC_MEMBERS = ("kty", "crv", "x", "y", "kid", "alg", "use")
DEFAULT_RELOAD_INTERVAL_SECONDS = 5  # how often the files are looked at for a change

# RFC 7638 thumbprint of key.json.example, which anyone can read: a server
# signing with it (or publishing it) trusts tokens that anyone can forge.
EXAMPLE_KEY_THUMBPRINT = "-1acZp7liNvJSVq6F1Iy3paaPtcojZJSg1ORYtjFCqQ"


# ---------------------------------------------------------------- errors

class ConfigError(Exception):
    """A bad flag, environment value or file: one line on stderr, exit status 2."""


class HTTPError(Exception):
    """An answer other than success, raised where the problem is found and
    sent as {"error": ..., "error_description": ...} (RFC 6749 §5.2)."""

    def __init__(self, status, error, description, headers=()):
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description
        self.headers = tuple(headers)


# ---------------------------------------------------------------- the pure core: base64url and JSON

_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64url(data):
    return binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=")


def b64url_encode(data):
    """RFC 7515 §2: base64url with the trailing '=' padding removed."""
    return _b64url(data).decode("ascii")


def b64url_decode(text):
    """Strict inverse of b64url_encode: no padding, no '+' or '/', no
    whitespace, and only the one canonical spelling of each byte string."""
    if not isinstance(text, str) or not _BASE64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url_encode(data) != text:  # stray low bits in the last character
        raise ValueError("not canonical base64url")
    return data


_compact_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def json_bytes(value):
    """Compact UTF-8 JSON, as the JWS segments and every response body use."""
    return _compact_json(value).encode("utf-8")


def _refuse_duplicate_members(pairs):
    # RFC 8259 §4: with duplicate names "the behavior of software ... is
    # unpredictable"; two parsers could read two different subjects.
    document = dict(pairs)
    if len(document) != len(pairs):
        raise ValueError("duplicate member name")
    return document


def _refuse_constant(name):
    raise ValueError("%s is not JSON" % name)


def _finite_number(text):
    number = float(text)
    if math.isinf(number):  # 1e400: it would be written back as Infinity, which is not JSON
        raise ValueError("number %s is out of range" % text[:40])
    return number


@functools.lru_cache(maxsize=None)
def _json_decoder(members, constant, number, integer):  # json.loads() makes one per call
    return json.JSONDecoder(object_pairs_hook=members, parse_constant=constant,
                            parse_float=number, parse_int=integer)


def parse_json(data, members=_refuse_duplicate_members, constant=_refuse_constant,
               number=_finite_number, integer=int):
    """Strict JSON from bytes: UTF-8, no duplicate member names (MEMBERS makes
    an object of its (name, value) pairs), no NaN or Infinity (CONSTANT), no
    number too large for a double (NUMBER). Raises ValueError
    (UnicodeDecodeError is one) with a message."""
    try:
        return _json_decoder(members, constant, number, integer).decode(data.decode("utf-8"))
    except RecursionError:
        raise ValueError("nested too deeply") from None


# ---------------------------------------------------------------- the pure core: keys

def _coordinate(n):
    return b64url_encode(n.to_bytes(P256_BYTES, "big"))


def thumbprint(jwk):
    """RFC 7638 §3.2: SHA-256 of the required members (for EC: crv, kty, x,
    y) in lexicographic order, no whitespace, base64url."""
    required = {"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"], "y": jwk["y"]}
    digest = hashes.Hash(hashes.SHA256())
    digest.update(json_bytes(required))
    return b64url_encode(digest.finalize())


def public_jwk(public_key, kid=None):
    """The public JWK as served: 32-byte x and y, "use", "alg", and a "kid"
    that defaults to the RFC 7638 thumbprint."""
    numbers = public_key.public_numbers()
    jwk = {"kty": "EC", "crv": "P-256", "x": _coordinate(numbers.x), "y": _coordinate(numbers.y)}
    jwk.update(use="sig", alg="ES256", kid=kid or thumbprint(jwk))
    return jwk


def private_jwk(private_key):
    """The private JWK a key file holds: what pem-to-jwk writes, plus "kid"."""
    public = public_jwk(private_key.public_key())
    d = _coordinate(private_key.private_numbers().private_value)
    return {"kty": "EC", "crv": "P-256", "x": public["x"], "y": public["y"], "d": d,
            "kid": public["kid"]}


def _jwk_integer(jwk, name):
    value = jwk.get(name)
    if value is None:
        raise ValueError('"%s" is missing' % name)
    try:
        data = b64url_decode(value)
    except ValueError:
        raise ValueError('"%s" is not base64url (RFC 7515 §2: "-" and "_", no "=" padding)'
                         % name) from None
    # Writers must give all 32 bytes; some tools drop leading zero bytes, and
    # the value is the same number either way, so shorter is read as is.
    if not 0 < len(data) <= P256_BYTES:
        raise ValueError('"%s" is %d bytes, not %d' % (name, len(data), P256_BYTES))
    return int.from_bytes(data, "big")


def parse_jwk(jwk):
    """Check one EC P-256 JWK; return (private_key or None, public_key, kid)."""
    if not isinstance(jwk, dict):
        raise ValueError("not a JSON object")
    for name, expected, required in (("kty", "EC", True), ("crv", "P-256", True),
                                     ("alg", "ES256", False), ("use", "sig", False)):
        if name not in jwk:
            if required:
                raise ValueError('"%s" is missing' % name)
        elif jwk[name] != expected:  # a short value named, a long one perhaps secret
            value = jwk[name]
            shown = (json.dumps(value) if isinstance(value, str) and len(value) <= 8 else
                     "a string of %d characters" % len(value) if isinstance(value, str) else
                     "JSON " + type(value).__name__)
            raise ValueError('"%s" must be "%s", not %s' % (name, expected, shown))
    kid = jwk.get("kid")
    if kid is not None and not (isinstance(kid, str) and kid):
        raise ValueError('"kid" must be a non-empty string')
    if kid is not None and _CONTROL.search(kid):  # it goes into log lines
        raise ValueError('"kid" must not hold control characters')
    x, y = _jwk_integer(jwk, "x"), _jwk_integer(jwk, "y")
    try:
        public_key = ec.EllipticCurvePublicNumbers(x, y, P256).public_key()
    except ValueError:
        raise ValueError('"x" and "y" are not a point on P-256') from None
    private_key = None
    if "d" in jwk:
        d = _jwk_integer(jwk, "d")
        if not 0 < d < P256_ORDER:
            raise ValueError('"d" is not a P-256 private key')
        if kid is not None and kid == jwk["d"]:
            raise ValueError('"kid" must not be the private key "d": it is published')
        private_key = ec.derive_private_key(d, P256)
        if private_key.public_key().public_numbers() != public_key.public_numbers():
            raise ValueError('"x" and "y" do not match "d"')
    return private_key, public_key, kid


def parse_pem_private_key(data):
    """An EC P-256 private key from PEM (SEC1 or PKCS#8, unencrypted)."""
    if b"PUBLIC KEY-----" in data:
        raise ValueError("PEM holds a public key; the issuer needs the private key")
    from cryptography.hazmat.primitives import serialization
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # what cryptography raises for a key that needs a password
        raise ValueError("PEM key is encrypted; decrypt it first "
                         "(openssl pkey -in KEY.pem -out PLAIN.pem)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("not a readable PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("PEM key is not an EC key; ES256 needs EC P-256")
    if key.curve.name != P256.name:
        raise ValueError("PEM key is on %s, not P-256 (prime256v1)" % key.curve.name)
    return key


class KeySet(NamedTuple):
    """The keys in use: one signs, all are published, the signer first.

    Rotation: make the key file a JWK Set with the new private key first and
    the old key after it (its public part is enough). Tokens are signed with
    the new key at once, and tokens signed with the old one still verify
    against the JWKS until the old key is taken out of the file."""

    signing_key: ec.EllipticCurvePrivateKey
    kid: str
    kids: tuple  # every published kid, the signing kid first
    header_segment: str  # the JWS protected header, encoded once per key
    access_header_segment: str  # the same with "typ": "at+jwt" (RFC 9068 §2.1)
    jwks_body: bytes
    uses_example_key: bool

    @classmethod
    def from_keys(cls, keys):
        """keys: (private_key or None, public_key, kid or None) in file order."""
        signing = next((k for k in keys if k[0] is not None), None)
        if signing is None:
            raise ValueError('no key has a private part ("d"): nothing to sign with')
        ordered = [signing] + [k for k in keys if k is not signing]
        jwks = [public_jwk(public_key, kid) for _, public_key, kid in ordered]
        kids = tuple(jwk["kid"] for jwk in jwks)
        for kid in kids:
            if kids.count(kid) > 1:
                raise ValueError("kid %s is used by more than one key" % json.dumps(kid))
        def header(typ):
            return b64url_encode(json_bytes({"alg": "ES256", "typ": typ, "kid": kids[0]}))
        return cls(signing_key=signing[0], kid=kids[0], kids=kids, header_segment=header("JWT"),
                   access_header_segment=header("at+jwt"),
                   jwks_body=json_bytes({"keys": jwks}),
                   uses_example_key=any(thumbprint(jwk) == EXAMPLE_KEY_THUMBPRINT for jwk in jwks))

    def sign(self, claims, members=b"", access_token=False):
        """A token with CLAIMS, then MEMBERS: more claims, as JSON object members
        (a subject's from --claims, encoded when the file was read). An
        ACCESS_TOKEN is typed as one, as RFC 9068 §2.1 asks of an OAuth 2.0 grant's."""
        payload = json_bytes(claims)
        if members:
            payload = payload[:-1] + b"," + members + b"}"
        header = self.access_header_segment if access_token else self.header_segment
        return sign_jws(self.signing_key, header, b64url_encode(payload))


def parse_key_file(data):
    """A KeySet from a key file's bytes: a private JWK, a JWK Set whose first
    private key signs, or a PEM private key. Raises ValueError saying why not."""
    if data.lstrip().startswith(b"-----BEGIN"):
        key = parse_pem_private_key(data)
        return KeySet.from_keys([(key, key.public_key(), None)])
    if not data.strip():
        raise ValueError("the file is empty")
    try:
        document = parse_json(data)
    except ValueError as error:
        raise ValueError("neither a PEM key nor valid JSON (%s)" % error) from None
    if not (isinstance(document, dict) and "keys" in document):
        return KeySet.from_keys([parse_jwk(document)])
    members = document["keys"]
    if not (isinstance(members, list) and members):
        raise ValueError('"keys" must be a non-empty list of JWKs')
    keys = []
    secrets = {member.get("d") for member in members if isinstance(member, dict)} - {None}
    for number, member in enumerate(members, 1):
        try:
            keys.append(parse_jwk(member))
            if member.get("kid") in secrets:
                raise ValueError('"kid" must not be a private key "d": it is published')
        except ValueError as error:
            # One bad key in a JWKS breaks every login at Vault: refuse the set.
            raise ValueError("key %d: %s" % (number, error)) from None
    return KeySet.from_keys(keys)


def _utc(seconds):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


LAST_NUMERIC_DATE = 253402300799  # 9999-12-31T23:59:59Z: what a calendar can show


def _kid(jwk):
    return jwk.get("kid") or thumbprint(jwk)  # the server's kid for a key that names none


def _stamp(jwk, name):
    value = jwk.get(name)
    if value is not None and not (type(value) is int and 0 <= value <= LAST_NUMERIC_DATE):
        raise ValueError('key %s: "%s" must be a NumericDate (whole seconds since 1970) before '
                         'the year 10000' % (_kid(jwk), name))
    return value


def rotation_step(document, new_key, now, publish_ahead, retire_after, force=False):
    """One step of a two-phase rotation of a key file's JSON DOCUMENT, which the
    server already accepts: ({"keys": [signer, next, retired...]}, what was done,
    what FORCE overrode). The next key (NEW_KEY, a private JWK, stamped
    published_at NOW) is published first and signs only at the step after;
    the signer it replaces is retired, public parts only, and dropped a step
    later. A step that would sign with a key published less than PUBLISH_AHEAD
    seconds, or drop one retired less than RETIRE_AFTER, raises ValueError
    saying when it will be safe, unless FORCE."""
    keys = document["keys"] if "keys" in document else [document]
    private = [key for key in keys if "d" in key]
    retired = [key for key in keys if "d" not in key]
    if len(private) > 2:
        raise ValueError("it holds %d private keys; a rotated file holds two, the signing key "
                         "and the next one" % len(private))
    for key in keys:
        _stamp(key, PUBLISHED_AT), _stamp(key, RETIRED_AT)
    # a retired key of unknown age (a hand-made set) is kept a whole step from now
    unstamped = [dict(key, **{RETIRED_AT: now}) for key in retired if RETIRED_AT not in key]
    next_key = dict(new_key, **{PUBLISHED_AT: now})
    if len(private) == 1:
        kept = [key if RETIRED_AT in key else dict(key, **{RETIRED_AT: now}) for key in retired]
        return ({"keys": [private[0], next_key] + kept}, [
            "published kid %s as the next key: it may sign from %s"
            % (next_key["kid"], _utc(now + publish_ahead))], [])
    signer, promoted = private
    waits = []  # (when it is safe, why not now)
    published = promoted.get(PUBLISHED_AT)
    if published is None:
        waits.append((None, "the next key %s has no %s" % (_kid(promoted), PUBLISHED_AT)))
    elif now < published + publish_ahead:
        waits.append((published + publish_ahead, "the next key %s was published at %s, %d s "
                      "ago (--publish-ahead %d)" % (_kid(promoted), _utc(published),
                                                     now - published, publish_ahead)))
    dropped = [key for key in retired if RETIRED_AT in key]
    for key in dropped:
        if now < key[RETIRED_AT] + retire_after:
            waits.append((key[RETIRED_AT] + retire_after, "kid %s was retired at %s, %d s ago "
                          "(--retire-after %d)" % (_kid(key), _utc(key[RETIRED_AT]),
                                                  now - key[RETIRED_AT], retire_after)))
    reasons = [why for _, why in waits]
    if waits and not force:
        times = [when for when, _ in waits]
        safe = ("never by itself" if None in times else
                "%s (in %d s)" % (_utc(max(times)), max(times) - now))
        raise ValueError("not safe before %s: %s; --force rotates anyway"
                         % (safe, "; ".join(reasons)))
    retiring = {name: signer[name] for name in PUBLIC_MEMBERS if name in signer}
    retiring[RETIRED_AT] = now
    done = ["signing with kid %s" % _kid(promoted),
            "published kid %s as the next key: it may sign from %s"
            % (next_key["kid"], _utc(now + publish_ahead)),
            "retired kid %s: still published, dropped by the first run from %s"
            % (_kid(signer), _utc(now + retire_after))]
    done += ["dropped kid %s" % _kid(key) for key in dropped]
    return {"keys": [promoted, next_key, retiring] + unstamped}, done, reasons


# ---------------------------------------------------------------- the pure core: claims and signing

def make_claims(sub, *, issuer, audience, ttl, now, jti, client_id=None, scope=()):
    """The JWT claims the issuer sets (RFC 7519 §4.1). One audience is a
    string, several a list (§4.1.3). An OAuth 2.0 client's token names it
    (RFC 9068 §2.2); a scope is one string, space-separated (RFC 8693 §4.2)."""
    claims = {"iss": issuer, "sub": sub}
    if audience:
        claims["aud"] = audience[0] if len(audience) == 1 else list(audience)
    claims["iat"] = claims["nbf"] = now  # in this order: iat, then nbf
    claims["exp"] = now + ttl
    claims["jti"] = jti
    if client_id is not None:
        claims["client_id"] = client_id
    if scope:
        claims[SCOPE] = " ".join(scope)
    return claims


def der_to_raw_signature(der):
    """RFC 7518 §3.4: the JWS signature is R and S as 32-byte big-endian
    integers, concatenated; not the DER that OpenSSL returns."""
    # DER SEQUENCE { INTEGER r, INTEGER s } (RFC 3279 §2.2.3). For P-256 it is
    # at most 72 bytes, so every length is one byte: slices, at a quarter of
    # the cost of decode_dss_signature(), which takes anything else.
    r_length = der[3] if len(der) > 3 else 0
    if der[:1] == b"\x30" and der[2:3] == b"\x02" and der[4 + r_length:5 + r_length] == b"\x02":
        r, s = der[4:4 + r_length], der[6 + r_length:]
        if len(r) <= P256_BYTES + 1 and len(s) <= P256_BYTES + 1:
            return (r[-P256_BYTES:].rjust(P256_BYTES, b"\0")
                    + s[-P256_BYTES:].rjust(P256_BYTES, b"\0"))
    r, s = decode_dss_signature(der)
    return r.to_bytes(P256_BYTES, "big") + s.to_bytes(P256_BYTES, "big")


def sign_jws(private_key, header_segment, payload_segment):
    """RFC 7515 §7.1 compact serialization: the signature is over the ASCII
    of BASE64URL(header) '.' BASE64URL(payload) (§5.1)."""
    signing_input = (header_segment + "." + payload_segment).encode("ascii")
    signature = der_to_raw_signature(private_key.sign(signing_input, ECDSA_SHA256))
    return (signing_input + b"." + _b64url(signature)).decode("ascii")


# What a subject (or a user name) may not hold: characters that hide or
# disguise what a log line, a Vault policy or an admin's screen shows.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1 (Unicode category Cc)
_INVISIBLE = re.compile("[\u2028\u2029"  # line and paragraph separators (Zl, Zp)
                        "\u034f\u115f\u1160\u3164\uffa0\u2800]")  # grapheme joiner, blank letters
# What emoji, Persian, Indic and CJK names need: the two zero-width joiners
# between letters, variation selectors after one; a flag's tag sequence.
_JOINERS_AND_SELECTORS = "\u200c\u200d\ufe00-\ufe0f\U000e0100-\U000e01ef"
_JOINER_OR_SELECTOR = re.compile("[%s]" % _JOINERS_AND_SELECTORS)
_LOOSE = re.compile("(?:^|(?<=[\x00-\x7f]))[%s](?!\u20e3)|[\u200c\u200d]$"  # \u20e3: keycaps
                    % _JOINERS_AND_SELECTORS)
_TAG_SEQUENCE = re.compile("\U0001f3f4[\U000e0020-\U000e007e]+\U000e007f")  # e.g. England's flag
_SURROGATE = re.compile("[\ud800-\udfff]")  # "\ud800" is valid JSON but no Unicode text


def subject_problem(name):
    """Why a string cannot be a token's subject (or a user's name), or None."""
    if not name:
        return "must not be empty"
    if len(name) > MAX_NAME_CHARS:
        return "is longer than %d characters" % MAX_NAME_CHARS
    if _CONTROL.search(name):
        return "must not contain control characters"
    if _SURROGATE.search(name):
        return "is not valid Unicode"
    if not name.isascii():
        kept = _JOINER_OR_SELECTOR.sub("", _TAG_SEQUENCE.sub("\U0001f3f4", name))
        categories = {unicodedata.category(c) for c in kept}
        if "Cf" in categories or _INVISIBLE.search(name) or _LOOSE.search(name):
            return "must not contain invisible or formatting characters"
        if "Cn" in categories or "Co" in categories:
            return "must not contain unassigned or private-use characters"
    if name.isspace():
        return "must not be only whitespace"
    return None


def _kind(value):
    """What a JSON value is, for a message that must not echo it."""
    return ("null" if value is None else "a boolean" if isinstance(value, bool)
            else "an integer" if isinstance(value, int) else "a number" if isinstance(value, float)
            else "a string" if isinstance(value, str) else "a list" if isinstance(value, list)
            else "an object")


def _cut(text, limit=64):
    return text if len(text) <= limit else text[:limit] + "..."


def _shown(text):
    """TEXT quoted for a message, escaped, and cut short."""
    return json.dumps(_cut(text))


def token_body(body, *, audience, ttl, name_required=True):
    """(name, audience, ttl, scope) that a JSON token request body {"name": ...,
    "audience": ..., "ttl": ..., "scope": ...} asks for, each checked, or
    HTTPError 400. The name is None where it is absent and not required; the
    audience and ttl are the configured AUDIENCE and TTL where absent; the
    scope is the text asked for, or None. Other members are ignored, as OAuth
    2.0 ignores unknown parameters (RFC 6749 §3.2), except a grant_type: an
    OAuth 2.0 client that sent JSON would otherwise get a token it cannot read."""
    try:
        document = parse_json(body)
    except UnicodeDecodeError:
        raise HTTPError(400, "invalid_request", "body is not UTF-8") from None
    except ValueError as error:
        raise HTTPError(400, "invalid_request", "body is not valid JSON: %s" % error) from None
    if not isinstance(document, dict):
        raise HTTPError(400, "invalid_request", "body must be a JSON object")
    if "grant_type" in document:
        raise oauth_needs_a_form()
    scope = document.get(SCOPE)
    if scope is not None and not isinstance(scope, str):
        raise HTTPError(400, "invalid_request", "scope must be a string, not %s" % _kind(scope))
    name = document.get("name")
    if name is None and name_required:
        raise HTTPError(400, "invalid_request", "name is required")
    if name is not None and not isinstance(name, str):
        raise HTTPError(400, "invalid_request", "name must be a string")
    problem = name is not None and subject_problem(name)
    if problem:
        raise HTTPError(400, "invalid_request", "name " + problem)
    return name, requested_audience(document.get("audience"), audience), \
        requested_ttl(document.get("ttl"), ttl), scope


def oauth_sent_as_json(body):
    """Whether BODY is a JSON object with a grant_type: an OAuth 2.0 client
    that sent JSON, which would otherwise get a token it cannot read."""
    try:
        document = parse_json(body)
    except ValueError:  # UnicodeDecodeError is one
        return False
    return isinstance(document, dict) and "grant_type" in document


def oauth_needs_a_form():
    return HTTPError(415, "invalid_request", "an OAuth 2.0 token request is a form: Content-Type "
                                             "%s (RFC 6749 section 4.4.2)" % FORM_TYPE)


def requested_audience(value, configured, parameter="audience"):
    """RFC 8707 §2: the audiences asked for (a string or a list), each one
    of the CONFIGURED, in the order asked; CONFIGURED when VALUE is None."""
    if value is None:
        return configured
    values = [value] if isinstance(value, str) else value
    if not (isinstance(values, list) and values and all(isinstance(v, str) for v in values)):
        raise HTTPError(400, "invalid_request", "audience must be a string or a non-empty list "
                                                "of strings, not %s" % _kind(value))
    for audience in values:
        if audience not in configured:
            raise HTTPError(400, "invalid_target", "%s '%s' is not one this issuer serves "
                            "(%s)" % (parameter, _cut(audience), "see --audience" if configured
                                      else "it has no --audience"))
    return tuple(dict.fromkeys(values))


def requested_ttl(value, longest):
    """The token lifetime asked for: an integer from 1 to LONGEST; LONGEST when VALUE is None."""
    if value is None:
        return longest
    if type(value) is not int or not 1 <= value <= longest:
        refused = _cut(str(value), 24) if type(value) is int else _kind(value)
        raise HTTPError(400, "invalid_request", "ttl must be an integer from 1 to %d, not %s"
                        % (longest, refused))
    return value


_BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def form_decode(data):
    """One name or value of an application/x-www-form-urlencoded body (the
    URL Standard's, which RFC 6749 Appendix B names): "+" is a space, %XX a
    byte, and the bytes are UTF-8. ValueError for a stray "%" or bad UTF-8."""
    try:
        if b"%" not in data:  # most are plain, as "grant_type=client_credentials" is
            return data.replace(b"+", b" ").decode("utf-8")
        if _BAD_PERCENT.search(data):
            raise ValueError("has a % that is not followed by two hex digits")
        return urllib.parse.unquote_to_bytes(data.replace(b"+", b" ")).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8 once decoded") from None


def parse_form(body):
    """{name: [values]} of a form body, strictly: a parameter without a value
    is omitted (RFC 6749 §3.2), and one given twice is a 400 unless it may repeat."""
    parameters = {}
    for pair in body.split(b"&"):
        name, _, value = pair.partition(b"=")
        try:
            name, value = form_decode(name), form_decode(value)
        except ValueError as error:
            raise HTTPError(400, "invalid_request", "the form body " + str(error)) from None
        if value:
            parameters.setdefault(name, []).append(value)
    for name, values in parameters.items():
        if len(values) > 1 and name not in REPEATABLE_PARAMETERS:
            raise HTTPError(400, "invalid_request", "parameter '%s' is given more than once"
                            % _cut(name))
    return parameters


_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 §3.3


def parse_scope(text):
    """The scope tokens of TEXT (RFC 6749 §3.3: one space between each), in
    order, each once; ValueError if it is not one."""
    tokens = text.split(" ")
    if not all(_SCOPE_TOKEN.fullmatch(token) for token in tokens):
        raise ValueError("must be scope tokens (printable ASCII, no quote or backslash) "
                         "with one space between each")
    return tuple(dict.fromkeys(tokens))


def granted_scope(requested, ceiling):
    """RFC 6749 §3.3: the scope a client is granted, REQUESTED (a string or
    None) within its CEILING (tokens); the whole ceiling when none is asked."""
    if requested is None:
        return ceiling
    try:
        tokens = parse_scope(requested)
    except ValueError as error:
        raise HTTPError(400, "invalid_scope", "scope " + str(error)) from None
    refused = [token for token in tokens if token not in ceiling]
    if refused:
        raise HTTPError(400, "invalid_scope", "scope '%s' is not one this client may have%s" % (
            _cut(refused[0]), "" if ceiling else " (it has none: see --claims)"))
    return tokens


class _Members(list):
    """A JSON object as its (name, value) pairs, duplicates kept, so that one
    can be reported with where it is."""


I_JSON_INTEGERS = 2 ** 53 - 1  # RFC 7493 §2.2: beyond, verifiers that read doubles round


def _checked(value, where, depth=0):
    """VALUE parsed with _Members made plain dicts; ValueError, saying WHERE
    (never a value, nor a name inside one), on a duplicate member, nesting
    over MAX_CLAIM_DEPTH, or a number a verifier cannot read exactly."""
    if depth > MAX_CLAIM_DEPTH:
        raise ValueError("%s is nested more than %d deep" % (where, MAX_CLAIM_DEPTH))
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("%s holds NaN, Infinity or a number out of range" % where)
    if type(value) is int and abs(value) > I_JSON_INTEGERS:
        raise ValueError("%s holds an integer beyond 2^53 - 1, which verifiers that read "
                         "numbers as doubles change (RFC 7493 §2.2); write it as a string" % where)
    if isinstance(value, list) and not isinstance(value, _Members):
        return [_checked(item, where, depth + 1) for item in value]
    if not isinstance(value, _Members):
        return value
    checked = {}
    for name, item in value:
        inner = ("subject %s" % _shown(name) if depth == 0 else
                 "%s, claim %s" % (where, _shown(name)) if depth == 1 else where)
        if name in checked:
            raise ValueError("%s appears twice" % inner if depth < 2 else
                             "%s has a member twice" % where)
        checked[name] = _checked(item, inner, depth + 1)
    return checked


def _folds(name):
    """NAME as verifiers that ignore case may compare it: folded down, and up
    then down (Java's equalsIgnoreCase takes "ıat" for "iat"; "ſub" folds to "sub")."""
    return {folded.replace("i\u0307", "i") for folded in (name.casefold(), name.upper().casefold())}


def _fold_clash(names, beside=None):
    """Two different names that fold alike, among NAMES (a dict), or one of
    NAMES and one of BESIDE ({fold: name}) that NAMES does not override; or None."""
    seen = {}
    for name in names:
        for fold in _folds(name):
            if seen.setdefault(fold, name) != name:
                return seen[fold], name
            other = (beside or {}).get(fold)
            if other is not None and other != name and other not in names:
                return other, name
    return None


def _member_text(name, value):
    return json_bytes({name: value})[1:-1]  # b'"name":value'


class Claims(NamedTuple):
    """A claims file, checked: each subject's claims and the "*" ones, kept
    as JSON members encoded once here, which a token splices in (encoding
    them per token cost 2.7% of a token: see the README's Performance)."""

    per_subject: dict  # subject -> (its own members, the names of "*" ones it overrides)
    everyone: dict  # name -> the member of a "*" claim
    everyone_text: bytes  # all of them, joined
    names: tuple  # every claim name the file sets, sorted
    scopes: dict  # subject or "*" -> its "scope", as tokens: the ceiling of what it is granted
    scope_names: tuple  # every scope token the file names, sorted

    def scope(self, sub):
        """SUB's scope ceiling: its own, else everyone's, else none."""
        return self.scopes.get(sub) or self.scopes.get(EVERYONE, ())

    def members(self, sub):
        """The JSON members of SUB's claims: "*" first, then its own over them."""
        own, overridden = self.per_subject.get(sub, (b"", ()))
        if overridden:
            kept = [text for name, text in self.everyone.items() if name not in overridden]
            return b",".join(kept + [own])
        if own and self.everyone_text:
            return self.everyone_text + b"," + own
        return own or self.everyone_text


NO_CLAIMS = Claims({}, {}, b"", (), {}, ())


def _claims_number(text):
    # NaN, Infinity, out of range: refused in _checked, which can say where
    if text.lstrip("-").isdigit():
        return int(text) if len(text) <= 400 else float("inf")
    return float(text)


def parse_claims_file(data):
    """Claims from a claims file's bytes: {"*": {...}, SUBJECT: {...}}. A
    ValueError names the subject and the claim and the problem, never a value."""
    try:
        document = parse_json(data, members=_Members, constant=_claims_number,
                              number=_claims_number, integer=_claims_number)
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8") from None
    except ValueError as error:
        raise ValueError("is not valid JSON: %s" % error) from None
    if not isinstance(document, _Members):
        raise ValueError("must be a JSON object of subjects and their claims, not %s"
                         % _kind(document))
    document = _checked(document, "the file")
    texts, scopes = {}, {}
    for subject, claims in document.items():
        who = "subject %s" % _shown(subject)
        problem = subject != EVERYONE and subject_problem(subject)
        if problem:
            raise ValueError("%s %s" % (who, problem))
        if not isinstance(claims, dict):
            raise ValueError("%s: its claims must be a JSON object, not %s"
                             % (who, _kind(claims)))
        texts[subject] = {}
        for name, value in claims.items():
            if not name:
                raise ValueError("%s: a claim name must not be empty" % who)
            folds = _folds(name)
            if not folds.isdisjoint(ISSUER_CLAIMS):  # "EXP", "ſub", "ıat": verifiers fold case
                raise ValueError("%s: claim %s is the issuer's own (in any case); it cannot "
                                 "be set here" % (who, _shown(name)))
            if not folds.isdisjoint((SCOPE, "scp")):  # "scp": what Okta, Azure and Spring read too
                if name != SCOPE:
                    raise ValueError("%s: claim %s: a scope is spelled %s, and is a ceiling "
                                     "that a token is granted within" % (
                                         who, _shown(name), _shown(SCOPE)))
                try:
                    scopes[subject] = parse_scope(value if isinstance(value, str) else "")
                except ValueError as error:
                    raise ValueError("%s: claim %s %s (RFC 6749 §3.3)"
                                     % (who, _shown(name), error)) from None
            try:
                texts[subject][name] = _member_text(name, value)
            except UnicodeEncodeError:  # "\ud800" is valid JSON but no Unicode text
                raise ValueError("%s, claim %s: holds text that is not valid Unicode"
                                 % (who, _shown(name))) from None
    everyone = texts.pop(EVERYONE, {})
    everyone_folds = {fold: name for name in everyone for fold in _folds(name)}
    for subject, own in ((EVERYONE, everyone), *texts.items()):
        clash = _fold_clash(own, None if subject == EVERYONE else everyone_folds)
        if clash:
            raise ValueError("subject %s: claims %s and %s differ only in case, and a verifier "
                             "that ignores case could read either" % (
                                 _shown(subject), _shown(clash[0]), _shown(clash[1])))
    everyone_size = sum(len(text) + 1 for text in everyone.values())  # a comma after each
    if 1 + everyone_size > MAX_SUBJECT_CLAIMS_BYTES:
        raise ValueError("subject \"*\": its claims are %d bytes as JSON, over %d"
                         % (1 + everyone_size, MAX_SUBJECT_CLAIMS_BYTES))
    per_subject = {}
    for subject, own in texts.items():
        overridden = frozenset(own) & frozenset(everyone)
        size = (1 + everyone_size + sum(len(text) + 1 for text in own.values())
                - sum(len(everyone[name]) + 1 for name in overridden))  # "{" ... "}"
        if size > MAX_SUBJECT_CLAIMS_BYTES:
            raise ValueError("subject %s: its claims (with the \"*\" ones) are %d bytes as JSON, "
                             "over %d" % (_shown(subject), size, MAX_SUBJECT_CLAIMS_BYTES))
        per_subject[subject] = (b",".join(text for name, text in own.items() if name != SCOPE),
                                overridden - {SCOPE})
    everyone.pop(SCOPE, None)  # a token's scope is the issuer's to write: what was granted
    names = sorted({name for claims in document.values() for name in claims})
    scope_names = sorted({token for tokens in scopes.values() for token in tokens})
    return Claims(per_subject, everyone, b",".join(everyone.values()), tuple(names), scopes,
                  tuple(scope_names))


def discovery_document(issuer, claims_supported, auth_methods, scopes_supported=()):
    """OpenID Connect Discovery 1.0 §3, enough for Vault's oidc_discovery_url,
    and OAuth 2.0 Authorization Server Metadata (RFC 8414 §2) in one: the
    client credentials grant and how clients authenticate for it. "issuer"
    is exactly as configured: Vault compares it byte for byte."""
    base = issuer.rstrip("/")
    document = {
        "issuer": issuer,
        "jwks_uri": base + "/auth/jwks",
        "token_endpoint": base + "/auth/token",
        "id_token_signing_alg_values_supported": ["ES256"],
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "claims_supported": list(claims_supported),
        "grant_types_supported": [CLIENT_CREDENTIALS],
        "token_endpoint_auth_methods_supported": list(auth_methods),
    }
    if scopes_supported:
        document["scopes_supported"] = list(scopes_supported)
    return document


# ---------------------------------------------------------------- the pure core: passwords

def _b64(data):  # the PHC string format's base64: standard alphabet, no padding
    return base64.b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text):
    if not re.fullmatch(r"[A-Za-z0-9+/]*", text) or len(text) % 4 == 1:
        raise ValueError("not base64")
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _has_scrypt():  # hashlib has it where Python's OpenSSL does
    import hashlib
    return hasattr(hashlib, "scrypt")


class PasswordHash(NamedTuple):
    """A salted, slow password hash in PHC string format:
    $scrypt$ln=14,r=8,p=1$SALT$HASH or $pbkdf2-sha256$i=600000$SALT$HASH."""

    scheme: str
    params: tuple  # (log2 N, r, p) for scrypt, (iterations,) for PBKDF2
    salt: bytes
    digest: bytes

    @classmethod
    def parse(cls, text):
        parts = text.split("$")
        if len(parts) != 5 or parts[0]:
            raise ValueError("not a $scheme$settings$salt$hash password hash")
        _, scheme, settings, salt, digest = parts
        names = {"scrypt": ("ln", "r", "p"), "pbkdf2-sha256": ("i",)}.get(scheme)
        if names is None:
            raise ValueError("unknown password hash scheme %s" % json.dumps(scheme)[:40])
        try:
            given = dict(setting.split("=", 1) for setting in settings.split(","))
            params = tuple(int(given.pop(name)) for name in names)
            salt, digest = _unb64(salt), _unb64(digest)
        except (KeyError, ValueError):
            raise ValueError("malformed %s settings, salt or hash" % scheme) from None
        if given or len(salt) < 8 or not 16 <= len(digest) <= 64 or not all(p > 0 for p in params):
            raise ValueError("malformed %s settings, salt or hash" % scheme)
        if scheme == "scrypt":
            log2_n, r, p = params
            memory = 128 * r << min(log2_n, 64)
            if not (SCRYPT_FLOOR_LOG2_N <= log2_n and memory <= SCRYPT_MAX_MEMORY_BYTES
                    and memory * p <= SCRYPT_MAX_WORK_BYTES):
                raise ValueError(
                    "scrypt ln=%d,r=%d,p=%d is out of bounds: ln %d or more, 128*r*2^ln at most "
                    "%d MiB, and p times that at most %d MiB" % (
                        log2_n, r, p, SCRYPT_FLOOR_LOG2_N, SCRYPT_MAX_MEMORY_BYTES >> 20,
                        SCRYPT_MAX_WORK_BYTES >> 20))
            if not _has_scrypt():
                raise ValueError("this Python's hashlib has no scrypt; use pbkdf2-sha256")
        elif not PBKDF2_FLOOR_ITERATIONS <= params[0] <= PBKDF2_MAX_ITERATIONS:
            raise ValueError("pbkdf2-sha256 needs %d to %d iterations, not %d"
                             % (PBKDF2_FLOOR_ITERATIONS, PBKDF2_MAX_ITERATIONS, params[0]))
        hashed = cls(scheme, params, salt, digest)
        if scheme == "pbkdf2-sha256" and hashed.work > PBKDF2_MAX_ITERATIONS:
            raise ValueError("pbkdf2-sha256 with a %d-byte hash costs %d iterations, over %d"
                             % (len(digest), hashed.work, PBKDF2_MAX_ITERATIONS))
        return hashed

    @property
    def work(self):
        """How costly a check is, comparable within a scheme: PBKDF2 runs its
        iterations once for each 32 bytes of the hash (RFC 8018 §5.2)."""
        return (2 ** self.params[0]) * self.params[1] * self.params[2] \
            if self.scheme == "scrypt" else self.params[0] * -(-len(self.digest) // 32)

    def derive(self, password):
        import hashlib
        secret = password.encode("utf-8")
        if self.scheme == "scrypt":
            log2_n, r, p = self.params
            return hashlib.scrypt(secret, salt=self.salt, n=2 ** log2_n, r=r, p=p,
                                  maxmem=256 * r * 2 ** log2_n, dklen=len(self.digest))
        return hashlib.pbkdf2_hmac("sha256", secret, self.salt, self.params[0],
                                   dklen=len(self.digest))

    def matches(self, password):
        import hmac
        return hmac.compare_digest(self.derive(password), self.digest)


def hash_password(password, salt):
    """A new password hash string: scrypt, or PBKDF2-SHA256 where there is none."""
    if _has_scrypt():
        scheme, params = "scrypt", (SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P)
        settings = "ln=%d,r=%d,p=%d" % params
    else:
        scheme, params = "pbkdf2-sha256", (PBKDF2_ITERATIONS,)
        settings = "i=%d" % PBKDF2_ITERATIONS
    digest = PasswordHash(scheme, params, salt, bytes(32)).derive(password)
    return "$%s$%s$%s$%s" % (scheme, settings, _b64(salt), _b64(digest))


def check_user_name(name):
    """A name that HTTP Basic can carry (RFC 7617 §2: no colon) and a log can show."""
    if ":" in name or subject_problem(name) is not None:
        raise ValueError("a user name must be 1-%d characters, with no colon, control or "
                         "invisible character, and not only whitespace" % MAX_NAME_CHARS)
    return name


def parse_auth_file(text):
    """{user: PasswordHash} from lines user:HASH; # comments and blank lines allowed."""
    users = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, encoded = line.partition(":")
        try:
            if not colon:
                raise ValueError("expected user:HASH")
            if check_user_name(user) in users:
                raise ValueError("user %s appears twice" % json.dumps(user))
            users[user] = PasswordHash.parse(encoded)
        except ValueError as error:
            raise ValueError("line %d: %s" % (number, error)) from None
    return users


def basic_credentials(authorization):
    """(user, password) from an Authorization header (RFC 7617 §2), or None."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):  # binascii.Error is a ValueError
        return None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon and user else None


# ---------------------------------------------------------------- the pure core: HTTP request heads

# RFC 9112 §3: request-line = method SP request-target SP HTTP-version; the
# method a token (RFC 9110 §5.6.2), the target of RFC 3986's visible ASCII (no
# space, control or other octet), the version "HTTP/" DIGIT "." DIGIT (§2.3).
_REQUEST_LINE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([\x21-\x7e]+) (HTTP/([0-9])\.[0-9])")
_HTTP_VERSION = re.compile(r"HTTP/[0-9]\.[0-9]")
# RFC 9112 §5: field-line = field-name ":" OWS field-value OWS, the name a
# token (RFC 9110 §5.6.2), the value without controls but HTAB (§5.5); a line
# ends in CRLF, or LF alone (RFC 9112 §2.2).
_FIELD_LINES = re.compile("(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e\x80-\xff]*\r?\n)*")
_HEAD_END = re.compile(rb"\n\r?\n")
_TOKEN_START = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]")  # a method's first byte (RFC 9110 §5.6.2)
_LEADING_EMPTY_LINES = re.compile(rb"[\r\n]{0,%d}" % (2 * MAX_EMPTY_LINES + 1))
_AUTHORITY = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9._~!$&'()*+,;=%-]*))(?::[0-9]*)?")
_ABSOLUTE_FORM = re.compile(r"(?i:https?)://([^/?#]*)([^?#]*)")


class RequestHead(NamedTuple):
    """A request line and its header fields, as parse_head read them."""

    method: str
    target: str
    path: str
    version: str  # "HTTP/1.1"
    fields: dict  # lower-case name -> value; repeated fields joined by ", " (RFC 9110 §5.3)
    size: int  # bytes the head took, through the empty line that ends it
    host: str  # whom the request is for (the target's host, else Host), lower-case; None in 1.0
    content_length: int
    keep_alive: bool
    expect_continue: bool


def _head_error(status, description):
    return HTTPError(status, "invalid_request", description)


@functools.lru_cache(maxsize=1024)
def _host_of(authority):
    """The host of an authority (RFC 3986 §3.2.2), lower-case, or HTTPError 400."""
    match = _AUTHORITY.fullmatch(authority)
    if match is None:
        raise _head_error(400, "not a valid host")
    literal, name = match.groups()
    if literal is not None:
        try:
            return str(ipaddress.IPv6Address(literal))
        except ValueError:
            raise _head_error(400, "not a valid host") from None
    return without_root_dot(name.lower())


def without_root_dot(name):
    """A fully qualified name as written without its last dot (RFC 1034 §3.1):
    "localhost." is localhost; "localhost.." keeps a dot and so is not."""
    return name[:-1] if name.endswith(".") else name


def _request_line(line):
    """(method, target, path, version, the authority of an absolute-form
    target or None) of a request line (RFC 9112 §3)."""
    if len(line) > MAX_REQUEST_LINE_BYTES:
        raise _head_error(414, "request line is longer than %d bytes" % MAX_REQUEST_LINE_BYTES)
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        bad_version = line.count(" ") == 2 and not _HTTP_VERSION.fullmatch(line.rpartition(" ")[2])
        raise _head_error(400, "malformed HTTP version" if bad_version else "malformed request line")
    method, target, version, major = match.groups()
    # RFC 9110 §6.2: a server answers in the highest version it speaks with
    # the major version received; HTTP/1.2 is served as 1.1, HTTP/2.0 not at all.
    if major != "1":
        raise _head_error(505, "only HTTP/1.x is served")
    if target[0] == "/":
        return method, target, target.partition("?")[0], version, None
    absolute = _ABSOLUTE_FORM.fullmatch(target.partition("?")[0])
    if absolute is None:  # authority-form, "*": no path this server has
        return method, target, target, version, None
    return method, target, absolute.group(2) or "/", version, absolute.group(1)


def parse_head(data):
    """The request head at the start of DATA (bytes), or None while it is not
    all there. Pure: it knows nothing of sockets or clocks, and raises
    HTTPError with the status for anything RFC 9112 does not allow. A bad
    request line is refused as soon as it is in, before the rest comes."""
    # §2.2: "a server that is expecting to receive and parse a request-line
    # SHOULD ignore at least one empty line (CRLF) received prior to the request-line."
    start = _LEADING_EMPTY_LINES.match(data).end() if data[:1] in b"\r\n" else 0
    if start > 2 * MAX_EMPTY_LINES:
        raise _head_error(400, "more than %d empty lines before the request line"
                          % MAX_EMPTY_LINES)
    line_end = data.find(b"\n", start)
    end = None if line_end < 0 else _HEAD_END.search(data, line_end)
    head_end = len(data) if end is None else end.end()
    if head_end - start > MAX_FIELDS + 2 and data.count(b"\n", start, head_end) > MAX_FIELDS + 2:
        raise _head_error(431, "more than %d header fields" % MAX_FIELDS)
    if line_end < 0:
        if len(data) - start > MAX_REQUEST_LINE_BYTES:
            raise _head_error(414, "request line is longer than %d bytes" % MAX_REQUEST_LINE_BYTES)
        if not _TOKEN_START.match(data, start, start + 1) and len(data) > start:
            raise _head_error(400, "malformed request line")  # not HTTP: a TLS hello, say
    else:
        # §2.2: "a recipient MAY recognize a single LF as a line terminator and
        # ignore any preceding CR"; a CR anywhere else fails the checks below.
        line = data[start:line_end].decode("iso-8859-1")
        method, target, path, version, authority = _request_line(
            line[:-1] if line.endswith("\r") else line)
    field_lines = data[line_end + 1:len(data) if end is None else end.start() + 1]
    if head_end > MAX_HEAD_BYTES:
        # the same answer whether the head came whole or was cut at the limit
        if any(len(line) > MAX_FIELD_LINE_BYTES + 1 for line in field_lines.split(b"\n")):
            raise _head_error(431, "a header field line is over %d bytes" % MAX_FIELD_LINE_BYTES)
        raise _head_error(431, "the request head is over %d bytes" % MAX_HEAD_BYTES)
    if end is None:
        return None
    text = field_lines.decode("iso-8859-1")
    lines = text.split("\n")[:-1]
    if len(text) > MAX_FIELD_LINE_BYTES + 1 and max(map(len, lines)) > MAX_FIELD_LINE_BYTES + 1:
        raise _head_error(431, "a header field line is over %d bytes" % MAX_FIELD_LINE_BYTES)
    # §5.1: "No whitespace is allowed between the field name and colon ... a
    # server MUST reject, with a response status code of 400"; §5.2: nor is
    # obs-fold, a line starting with whitespace (it fails the same test).
    if not _FIELD_LINES.fullmatch(text):
        raise _head_error(400, "malformed header field")
    fields, hosts = {}, 0
    for field_line in lines:
        name, _, value = field_line.partition(":")
        name, value = name.lower(), value.strip(" \t\r")
        hosts += name == "host"
        fields[name] = fields[name] + ", " + value if name in fields else value

    # §3.2: "A server MUST respond with a 400 (Bad Request) status code to any
    # HTTP/1.1 request message that lacks a Host header field and to any request
    # message that contains more than one Host header field line or a Host
    # header field with an invalid field value."
    if hosts > 1 or (hosts == 0 and version != "HTTP/1.0"):
        raise _head_error(400, "exactly one Host header is required (RFC 9112 section 3.2)")
    host = _host_of(fields["host"]) if hosts else None
    if authority is not None:
        # §3.2.2: the server "MUST ignore the received Host header field (if any)
        # and instead use the host information of the request-target"; RFC 9110
        # §4.2.4: a userinfo in an http(s) URI is to be treated as an error.
        if "@" in authority:
            raise _head_error(400, "a request target must not hold a user name")
        host = _host_of(authority)

    # §6.1: a server that receives a transfer coding it does not understand
    # SHOULD answer 501; chunked bodies are refused rather than guessed at.
    if "transfer-encoding" in fields:
        raise HTTPError(411, "invalid_request", "Transfer-Encoding is not supported; send a "
                                                "Content-Length")
    content_length = 0
    if "content-length" in fields:
        # §6.3: an invalid Content-Length is an unrecoverable error, "unless the
        # field value can be successfully parsed as a comma-separated list, all
        # values in the list are valid, and all values in the list are the same".
        lengths = {length.strip() for length in fields["content-length"].split(",")}
        length = lengths.pop()
        if lengths or not (length.isascii() and length.isdigit()):
            raise _head_error(400, "Content-Length is not a valid length")
        if len(length) > 9 or int(length) > MAX_BODY_BYTES:
            raise _head_error(413, "body is over %d bytes" % MAX_BODY_BYTES)
        content_length = int(length)

    # §9.3: HTTP/1.1 connections persist unless "close" is sent; HTTP/1.0 ones
    # only with "keep-alive".
    keep_alive = version != "HTTP/1.0"
    if "connection" in fields:
        connection = {token.strip().lower() for token in fields["connection"].split(",")}
        keep_alive = "close" not in connection and (keep_alive or "keep-alive" in connection)
    expect_continue = (version != "HTTP/1.0"
                       and fields.get("expect", "").lower() == "100-continue")
    return RequestHead(method, target, path, version, fields, end.end(), host, content_length,
                       keep_alive, expect_continue)


def _ip(text):
    """TEXT as an ip_address, an IPv4-mapped IPv6 one as IPv4; None if it is none."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return ip.ipv4_mapped or ip if ip.version == 6 else ip


def trusted_proxy(address, networks):
    """ADDRESS as an ip_address when it is in one of the trusted NETWORKS; else None."""
    ip = _ip(address) if networks else None
    return ip if ip is not None and any(ip in network for network in networks) else None


MAX_FORWARDED_HOPS = 16  # trusted proxies walked through, at most
_PORT = re.compile(r"[0-9]{1,5}")


def _node_address(node):
    """The address of a node of X-Forwarded-For, or of Forwarded's for= (RFC 7239
    §6): an address, an IPv6 one in brackets, either with a port, maybe quoted;
    None for anything else ("unknown", an obfuscated "_hidden", a zone index)."""
    node = node.strip(" \t")
    if len(node) > 64:  # the longest such node is 55 characters
        return None
    if len(node) > 1 and node[0] == node[-1] == '"':
        node = node[1:-1]
    if node.startswith("["):
        address, _, port = node[1:].partition("]")
        port = port[1:] if port.startswith(":") else port or "0"
    elif node.count(":") == 1:
        address, _, port = node.partition(":")
    else:
        address, port = node, "0"
    if not (_PORT.fullmatch(port) and int(port) <= 65535) or "%" in address:
        return None
    return _ip(address)
_FORWARDED_FOR = re.compile(r'(?:^|;)\s*for\s*=\s*("[^"]*"|[^;]*)', re.I)


def forwarded_client(fields, proxy, trusted):
    """Whom a request from the trusted PROXY (an ip_address) is for: walking
    X-Forwarded-For, else RFC 7239 Forwarded, from the right (the hops the
    proxies added), the first address that is not TRUSTED; when every one
    walked is, the last. A header that is missing or names no address where the walk
    needs one: the proxy itself. A string."""
    if "x-forwarded-for" in fields:
        nodes = fields["x-forwarded-for"].split(",")
    elif "forwarded" in fields:
        nodes = []
        for element in fields["forwarded"].split(","):
            found = _FORWARDED_FOR.search(element)
            nodes.append(found.group(1) if found else "")
    else:
        return str(proxy)
    client = None
    for node in reversed(nodes[-MAX_FORWARDED_HOPS:]):
        client = _node_address(node)
        if client is None:
            return str(proxy)
        if not any(client in network for network in trusted):
            break
    return str(client)


REASONS = {status.value: status.phrase for status in HTTPStatus}
JSON_TYPE = "application/json"
NO_STORE = (("Cache-Control", "no-store"), ("Pragma", "no-cache"))  # RFC 6749 §5.1
REVALIDATE = (("Cache-Control", "no-cache"),)  # keys may rotate at any reload
_NOT_IN_DESCRIPTIONS = re.compile(r'[^\x20-\x21\x23-\x5b\x5d-\x7e]')  # RFC 6749 §5.2


def error_answer(error):
    """An HTTPError as an answer: (status, content type, body, headers)."""
    description = _NOT_IN_DESCRIPTIONS.sub("?", error.description)
    body = json_bytes({"error": error.error, "error_description": description})
    return error.status, JSON_TYPE, body, NO_STORE + error.headers


def render_answer(status, content_type, body, headers, connection, date, with_body=True):
    """An answer's bytes: head and body, written in one send. CONNECTION is
    "close", "keep-alive" (for HTTP/1.0) or None."""
    head = (_head_template(status, content_type, headers, connection)
            % (date, len(body))).encode("latin-1")
    return head + body if with_body else head


@functools.lru_cache(maxsize=256)
def _head_template(status, content_type, headers, connection):
    # the same for every answer of its kind, but its Date (%s) and length (%d)
    lines = ["HTTP/1.1 %d %s" % (status, REASONS[status]), "Date: %s",
             "Content-Type: " + content_type.replace("%", "%%"), "Content-Length: %d",
             "X-Content-Type-Options: nosniff"]
    lines.extend(("%s: %s" % header).replace("%", "%%") for header in headers)
    if connection is not None:
        lines.append("Connection: " + connection)
    return "\r\n".join(lines) + "\r\n\r\n"


_date_cache = (0, "")


def http_date(now):
    """RFC 9110 §6.6.1 Date, formatted once a second."""
    global _date_cache
    second = int(now)
    if _date_cache[0] != second:
        _date_cache = (second, email.utils.formatdate(second, usegmt=True))
    return _date_cache[1]


# ---------------------------------------------------------------- configuration

def _integer(low, high):
    def parse(text, source):
        if not (text.isascii() and text.isdigit() and len(text) <= 11
                and low <= int(text) <= high):
            raise ConfigError("%s must be an integer from %d to %d, not %s"
                              % (source, low, high, json.dumps(text)[:40]))
        return int(text)
    return parse


def _file(text, source):
    if not text:
        raise ConfigError("%s must name a file" % source)
    return text


def _text(text, source):
    return text  # checked with the rest of the configuration, in Config


def _names(texts, source):
    return tuple(texts)


def _seconds(text, source):
    if re.fullmatch(r"[0-9]{1,6}(\.[0-9]{1,3})?", text):
        return float(text)
    raise ConfigError("%s must be seconds, from 0 to 999999 with up to 3 decimals, not %s"
                      % (source, json.dumps(text)[:40]))


_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def _networks(texts, source):
    networks = []
    for text in texts:
        try:
            network = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            raise ConfigError("%s must be an IP address or a CIDR block such as 10.0.0.0/8, "
                              "not %s" % (source, json.dumps(text)[:60])) from None
        if network.version == 6 and network.prefixlen >= 96 and network.subnet_of(_MAPPED):
            # a peer's IPv4-mapped address is compared as IPv4 (see _ip)
            network = ipaddress.ip_network((network.network_address.ipv4_mapped,
                                            network.prefixlen - 96))
        networks.append(network)
    return tuple(networks)


class Option(NamedTuple):
    """A setting: its flag, and its environment variable JWT_ISSUER_<FLAG>."""

    flag: str
    field: str  # of Config
    metavar: str
    parse: object  # (text, where it came from) -> value; for a list, (texts, source)
    default: str  # as --help and the README say it
    help: str
    repeat: bool = False  # the flag may repeat; the environment gives a comma-separated list

    @property
    def env(self):
        return "JWT_ISSUER_" + self.flag[2:].replace("-", "_").upper()


# The one table of settings: argparse, --help and the README's table are made
# from it (a test holds the README to it).
OPTIONS = (
    Option("--host", "host", "HOST", _text, DEFAULT_HOST,
           "address to listen on; the token endpoint is open unless --auth-file or "
           "--tls-client-ca is given, so listen wider only on purpose"),
    Option("--port", "port", "PORT", _integer(0, 65535), str(DEFAULT_PORT),
           "port to listen on; 0 picks a free one, which the listening line reports"),
    Option("--key", "key_path", "FILE", _text, DEFAULT_KEY_PATH + ", made when missing",
           "private key: a JWK, a JWK Set (the first private key signs, all are published) "
           "or an EC P-256 PEM; a key named by flag or environment must exist"),
    Option("--issuer", "issuer", "URL", _text, "http://localhost:PORT",
           'the "iss" claim and the discovery issuer, used exactly as given'),
    Option("--audience", "audience", "AUD", _names, "none: no aud claim",
           'an "aud" value; repeat for several; any flag replaces the environment\'s list',
           repeat=True),
    Option("--ttl", "ttl", "SECONDS", _integer(1, 10 ** 10), str(DEFAULT_TTL_SECONDS),
           "token lifetime, and the longest a request may ask for"),
    Option("--claims", "claims_file", "FILE", _file, "none: the issuer's claims only",
           'JSON object of subjects, each with the claims its tokens carry beside sub '
           '(groups, team, ...); "*" holds everyone\'s, under each subject\'s own'),
    Option("--max-connections", "max_connections", "N", _integer(1, 100000),
           "%d, per process" % DEFAULT_MAX_CONNECTIONS,
           "connections served at once, one thread each; when all are taken, the client "
           "address holding the most gives way first"),
    Option("--workers", "workers", "N", _integer(1, 64), "1",
           "processes serving the one listening socket, forked after the bind; the first "
           "process supervises them"),
    Option("--auth-file", "auth_file", "FILE", _file, "none: the token endpoint is open",
           "lines user:HASH (see hash-password): POST /auth/token then needs HTTP Basic, "
           "and the user is the subject"),
    Option("--tls-cert", "tls_cert", "FILE", _file, "none: plain HTTP",
           "PEM certificate (chain): serve HTTPS, with --tls-key"),
    Option("--tls-key", "tls_key", "FILE", _file, "none", "PEM private key of --tls-cert"),
    Option("--tls-client-ca", "tls_client_ca", "FILE", _file, "none",
           "PEM CA: POST /auth/token then needs a client certificate it signed, whose common "
           "name is the subject unless --auth-file is on too"),
    Option("--reload-interval", "reload_interval", "SECONDS", _seconds,
           str(DEFAULT_RELOAD_INTERVAL_SECONDS),
           "how often the key, claims, auth and TLS files are looked at: one that changed "
           "(through a symlink too) reloads them all, as SIGHUP does; 0 turns this off"),
    Option("--trusted-proxy", "trusted_proxies", "CIDR", _networks,
           "none: the peer is the client",
           "a proxy (address or CIDR block; repeatable) whose X-Forwarded-For, else Forwarded, "
           "names the client: the rightmost address there that is not a trusted proxy counts "
           "for the login limiter and the access log", repeat=True),
    Option("--allowed-host", "allowed_hosts", "NAME", _names,
           "with a loopback --host: localhost and the issuer's host",
           "a Host name to serve (repeatable); other names get 421, against DNS rebinding; "
           "turns the check on for any --host", repeat=True),
)


def is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Settings(NamedTuple):
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    key_path: str = DEFAULT_KEY_PATH
    key_path_given: bool = False  # a key named on purpose must exist; the default is made
    issuer: str = None  # None until the port is bound: then http(s)://localhost:PORT
    audience: tuple = ()
    ttl: int = DEFAULT_TTL_SECONDS
    claims_file: str = None  # subjects -> the claims their tokens carry
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    workers: int = 1  # processes, forked after the bind
    auth_file: str = None  # users and password hashes: POST /auth/token needs HTTP Basic
    tls_cert: str = None  # with tls_key: HTTPS
    tls_key: str = None
    tls_client_ca: str = None  # POST /auth/token needs a client certificate from this CA
    allowed_hosts: tuple = ()  # Host names served besides the loopback ones
    reload_interval: float = DEFAULT_RELOAD_INTERVAL_SECONDS  # 0: only SIGHUP reloads
    trusted_proxies: tuple = ()  # ip_network: peers whose forwarding headers name the client


class Config(_Settings):
    """Everything the server is told, checked once; the flags win over the environment."""

    __slots__ = ()

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls, *args, **kwargs)
        self._check()
        return self

    def _check(self):
        if not self.host:
            raise ConfigError("host must not be empty (0.0.0.0 listens on every IPv4 address)")
        if not self.key_path:
            raise ConfigError("key file name must not be empty")
        if self.issuer is not None:
            url = _ABSOLUTE_FORM.fullmatch(self.issuer)
            # OpenID Connect Discovery §3: https (http here for local use), no query or fragment.
            try:
                if url is None or not url.group(1) or "@" in url.group(1):
                    raise _head_error(400, "no host")
                _host_of(url.group(1))
            except HTTPError:
                raise ConfigError("issuer must be an http(s) URL with a host and no query or "
                                  "fragment, not %s" % json.dumps(self.issuer)) from None
        if any(not aud.strip() for aud in self.audience):
            raise ConfigError("an audience must be a non-empty string")
        if any(not name.strip() for name in self.allowed_hosts):
            raise ConfigError("an allowed host must be a non-empty name")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")

    @property
    def scheme(self):
        return "http" if self.tls_cert is None else "https"

    @classmethod
    def from_args(cls, args, environ):
        """From parsed flags (None where not given) and an environment mapping;
        an empty environment variable counts as unset."""
        values = {}
        for option in OPTIONS:
            given = getattr(args, option.field)
            if given is not None:
                value = option.parse(given, option.flag)
            elif environ.get(option.env):
                text = environ[option.env]
                if option.repeat:
                    text = [item.strip() for item in text.split(",") if item.strip()]
                value = option.parse(text, option.env)
            else:
                continue
            values[option.field] = value
        if "key_path" in values:
            values["key_path_given"] = True
        return cls(**values)

    def bound_to(self, port):
        """The issuer URL defaults to the bound port, known only after the bind."""
        if self.issuer is not None:
            return self
        return self._replace(issuer="%s://localhost:%d" % (self.scheme, port))


# ---------------------------------------------------------------- files

def open_regular_file(path, what, limit):
    """PATH opened for reading if it is a regular file of at most LIMIT bytes;
    else ConfigError. Opened without blocking, so that a FIFO or a device at
    the path cannot hang the open (and with it a reload, or the stop after it)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        file = open(path, "rb", opener=lambda name, _: os.open(name, flags))
    except FileNotFoundError:
        raise ConfigError("%s %s does not exist" % (what, path)) from None
    except OSError as error:
        raise ConfigError("cannot read %s %s: %s" % (what, path, error.strerror or error)) from None
    status = os.fstat(file.fileno())
    problem = ("cannot read %s %s: %s" % (what, path, os.strerror(errno.EISDIR))
               if stat.S_ISDIR(status.st_mode) else
               "%s %s is not a regular file" % (what, path) if not stat.S_ISREG(status.st_mode)
               else "%s %s is over %d bytes" % (what, path, limit) if status.st_size > limit
               else None)
    if problem:
        file.close()
        raise ConfigError(problem)
    return file


def read_file(path, what, limit):
    """(bytes, os.stat_result) of a regular file of at most LIMIT bytes; else ConfigError."""
    with open_regular_file(path, what, limit) as file:
        try:
            data = file.read(limit + 1)
        except OSError as error:
            raise ConfigError("cannot read %s %s: %s" % (what, path, error.strerror)) from None
        if len(data) > limit:  # it grew since
            raise ConfigError("%s %s is over %d bytes" % (what, path, limit))
        return data, os.fstat(file.fileno())


def write_new_file(path, data):
    """Write data to a new file, mode 0600, all or nothing, never over an
    existing file: link(), unlike rename(), fails if the name is taken."""
    write_file(path, data, install=os.link)


ACL = "system.posix_acl_access"  # an access control list, where the file system has them


def write_file(path, data, mode=0o600, install=os.replace, owner=None, acl=None):
    """Write DATA to PATH all or nothing, so that a reader sees the old file
    or the new one, never half: a temp file in the same directory (mode 0600
    until the data is in, then MODE, OWNER's (uid, gid) where this user may
    give it, and the ACL, as bytes), fsync, INSTALL (rename or link) at PATH,
    fsync of the directory."""
    import tempfile
    directory = os.path.dirname(path) or "."
    try:
        fd, temp_path = tempfile.mkstemp(dir=directory, prefix=".jwt_issuer-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as temp:
                temp.write(data)
                temp.flush()
                if owner is not None:
                    with contextlib.suppress(PermissionError):  # root rotating a service's key
                        os.fchown(temp.fileno(), *owner)
                    status = os.fstat(temp.fileno())
                    if (status.st_uid, status.st_gid) != owner:
                        raise ConfigError("%s belongs to uid %d, gid %d, which this user cannot "
                                          "give a new file; write it as its owner, or root"
                                          % ((path,) + owner))
                os.fchmod(temp.fileno(), mode)
                if acl:  # after the mode: its group bits are the ACL's mask
                    os.setxattr(temp.fileno(), ACL, acl)
                os.fsync(temp.fileno())
            install(temp_path, path)
        finally:
            with contextlib.suppress(FileNotFoundError):  # renamed away
                os.unlink(temp_path)
        directory_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)
    except FileExistsError:
        raise ConfigError("%s already exists; not overwriting it" % path) from None
    except OSError as error:
        raise ConfigError("cannot write %s: %s" % (path, error.strerror or error)) from None


def _warn_if_others_can_read(what, path, status):
    """Others may not read a secret; its group may, when it is this process's own
    (a Kubernetes Secret mounted with fsGroup is 0440, its group the pod's)."""
    mode = status.st_mode
    if mode & 0o007 or (mode & 0o070 and status.st_gid not in {os.getegid(), *os.getgroups()}):
        log.warning("%s %s can be read by group or others (mode %04o): chmod 600 %s",
                    what, path, mode & 0o7777, path)


def load_keyset(path):
    """Read and check a key file; ConfigError names the file and the problem."""
    data, status = read_file(path, "key file", MAX_KEY_FILE_BYTES)
    try:
        keys = parse_key_file(data)
    except ValueError as error:
        raise ConfigError("key file %s: %s" % (path, error)) from None
    if keys.uses_example_key:  # public: who can read the file does not matter
        log.warning("THE KEY IN %s IS THE PUBLIC EXAMPLE KEY OF key.json.example: ANYONE CAN "
                    "FORGE TOKENS THAT VERIFY AGAINST THIS JWKS. Make your own: "
                    "python jwt_issuer.py genkey -o key.json", path)
    else:
        _warn_if_others_can_read("key file", path, status)
    return keys


def load_users(path):
    """{user: PasswordHash} from an auth file; ConfigError names the file, the line, the problem."""
    data, status = read_file(path, "auth file", MAX_AUTH_FILE_BYTES)
    try:
        users = parse_auth_file(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("auth file %s is not UTF-8" % path) from None
    except ValueError as error:
        raise ConfigError("auth file %s %s" % (path, error)) from None
    if not users:
        log.warning("auth file %s has no users: every token request is refused", path)
    settings = {(hashed.scheme, hashed.work) for hashed in users.values()}
    if len(settings) > 1:  # an unknown name costs the costliest: a cheaper hash answers sooner
        log.warning("auth file %s holds hashes of %d different costs: a user with a cheaper "
                    "one answers faster than an unknown name, which tells that the name exists; "
                    "hash-password them all with the same settings", path, len(settings))
    _warn_if_others_can_read("auth file", path, status)
    return users


def load_claims(path):
    """Claims from a claims file; ConfigError names the file, the subject, the problem."""
    data, _ = read_file(path, "claims file", MAX_CLAIMS_FILE_BYTES)
    try:
        return parse_claims_file(data)
    except ValueError as error:
        raise ConfigError("claims file %s: %s" % (path, error)) from None


def watched_files(config):
    """The files a reload reads."""
    return tuple(path for path in (config.key_path, config.claims_file, config.auth_file,
                                   config.tls_cert, config.tls_key, config.tls_client_ca)
                 if path is not None)


def file_signature(path):
    """What changes when the file at PATH does: which file it is, its size and
    times, through symlinks (a Kubernetes Secret volume swaps its ..data link);
    or, when it cannot be seen, why not."""
    try:
        status = os.stat(path)
    except OSError as error:
        return error.errno
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns


class FileWatcher:
    """PATHS, to be looked at every INTERVAL seconds. A look comes before the read
    it may lead to, so that a change made during a read is seen at the next look."""

    def __init__(self, paths, interval):
        self.paths, self.interval = paths, interval
        self._seen = self._look()

    def _look(self):
        return {path: file_signature(path) for path in self.paths}

    def look_now(self):
        """Before a reload that a signal asked for: what it reads is what is seen."""
        self._seen = self._look()

    def missing_found(self):
        """Take as seen a file that was missing at the first look: the key file made at start."""
        self._seen.update((path, file_signature(path)) for path, seen in self._seen.items()
                          if isinstance(seen, int))

    def changed(self):
        """The files changed since the last look."""
        seen, self._seen = self._seen, self._look()
        return [path for path in self.paths if self._seen[path] != seen[path]]


def _no_passphrase(path):
    raise ConfigError("TLS key %s is encrypted; give it unencrypted, readable by this user "
                      "alone" % path)


def load_tls_context(config):
    """TLS 1.2 and up, AEAD suites only; with a client CA, the handshake asks for
    a client certificate (and checks one that comes) but does not demand one:
    verifiers fetch the JWKS without."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    # ssl loads a certificate chain only from a path: it gets the one of the file
    # already opened and checked, so that no FIFO swapped in since can hang it.
    with open_regular_file(config.tls_cert, "TLS certificate", MAX_TLS_FILE_BYTES) as cert, \
            open_regular_file(config.tls_key, "TLS key", MAX_TLS_FILE_BYTES) as key:
        try:
            context.load_cert_chain(*(
                "/dev/fd/%d" % file.fileno() if os.path.isdir("/dev/fd") else file.name
                for file in (cert, key)), password=lambda: _no_passphrase(config.tls_key))  # no prompt
        except (OSError, ssl.SSLError) as error:
            raise ConfigError("cannot load the TLS certificate %s and key %s: %s" % (
                config.tls_cert, config.tls_key, getattr(error, "strerror", None) or error)
            ) from None
    if config.tls_client_ca is not None:
        data, _ = read_file(config.tls_client_ca, "client CA", MAX_TLS_FILE_BYTES)
        try:
            context.load_verify_locations(cadata=data.decode("ascii"))
        except (ValueError, ssl.SSLError) as error:  # UnicodeDecodeError, no certificate
            raise ConfigError("cannot load the client CA %s: %s" % (
                config.tls_client_ca, getattr(error, "reason", None) or error)) from None
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def obtain_keys(config):
    """The configured keys; the default ./key.json is made when missing."""
    if not config.key_path_given and not os.path.exists(config.key_path):
        jwk = private_jwk(ec.generate_private_key(P256))
        try:
            write_new_file(config.key_path, (json.dumps(jwk, indent=2) + "\n").encode())
            log.info("no key file at %s: generated a new P-256 key, kid %s, saved with mode 0600",
                     config.key_path, jwk["kid"])
        except ConfigError as error:
            if not os.path.exists(config.key_path):  # else another process has just made it
                raise ConfigError("no key file at %s, and making one failed (%s); name a key "
                                  "with --key" % (config.key_path, error)) from None
    return load_keyset(config.key_path)


# ---------------------------------------------------------------- the Issuer: what a reload replaces

def too_many_checks():
    return HTTPError(503, "temporarily_unavailable", "too many password checks at once",
                     headers=[("Retry-After", "1")])


class _Check:
    """A check of some credentials under way, and how it ended."""

    __slots__ = ("done", "unavailable")

    def __init__(self):
        self.done, self.unavailable = threading.Event(), False


class Users:
    """An auth file's users, and the checking of their passwords.

    A name that is not in the file costs a check with the costliest settings
    in the file (on a dummy hash), so that the answer and its time are the same
    as for a wrong password. A password that checked out is remembered for
    VERIFIED_CACHE_SECONDS under an HMAC of the credentials with a key of this
    process's, so a busy client does not pay a slow hash per token and no
    password is kept; a reload makes new Users, with nothing remembered."""

    checks_at_once = threading.BoundedSemaphore(PASSWORD_CHECKS_AT_ONCE)

    def __init__(self, hashes):
        import hmac
        self.hashes = hashes
        self._keyed_hash = hmac.digest
        self._cache_key = os.urandom(32)
        self._verified = {}  # HMAC of the credentials -> when it expires
        self._checking = {}  # HMAC of credentials being checked now -> set when that ends
        self._lock = threading.Lock()
        self._dummy = self._costliest(hashes.values())

    @staticmethod
    def _costliest(hashes):
        # Within a scheme the settings say which costs most; across the two
        # schemes only a clock can, once per reload.
        per_scheme = {}
        for candidate in hashes:
            if candidate.work > getattr(per_scheme.get(candidate.scheme), "work", 0):
                per_scheme[candidate.scheme] = candidate
        if not per_scheme:
            return PasswordHash.parse(hash_password("", os.urandom(16)))

        def seconds(candidate):
            started = time.perf_counter()
            candidate.derive("")
            return time.perf_counter() - started
        settings = max(per_scheme.values(), key=seconds) if len(per_scheme) > 1 \
            else next(iter(per_scheme.values()))
        return settings._replace(salt=os.urandom(16), digest=os.urandom(len(settings.digest)))

    def _cache_key_of(self, user, password):
        user_bytes = user.encode("utf-8")  # length-prefixed: user and password cannot blur
        credentials = b"%d:%s%s" % (len(user_bytes), user_bytes, password.encode("utf-8"))
        return self._keyed_hash(self._cache_key, credentials, "sha256")

    def remembers(self, user, password, now):
        """Whether these credentials checked out within VERIFIED_CACHE_SECONDS."""
        expires = self._verified.get(self._cache_key_of(user, password))
        return expires is not None and expires > now

    @contextlib.contextmanager
    def one_check_at_a_time(self, user, password):
        """True for the first thread to check these credentials now. Another
        waits until that check has ended (which is bounded: a check slot within
        REQUEST_TIMEOUT_SECONDS, then one hash), then gets False; or the 503 it
        ended with, as no slot is free for this one either. A burst of one
        client's good credentials (at start, after a reload, however slow the
        check) so pays one slow hash and counts no guesses."""
        key = self._cache_key_of(user, password)
        with self._lock:
            check = self._checking.get(key)
            first = check is None
            if first:
                check = self._checking[key] = _Check()
        if not first:
            if not check.done.wait(2 * REQUEST_TIMEOUT_SECONDS) or check.unavailable:
                raise too_many_checks()
            yield False
            return
        try:
            yield True
        except HTTPError as error:
            check.unavailable = error.status == 503
            raise
        finally:
            with self._lock:
                del self._checking[key]
            check.done.set()

    def check(self, user, password, now):
        """None when the credentials are good, else why not (for the log): one
        slow hash, whoever the user."""
        expected = self.hashes.get(user)
        if not self.checks_at_once.acquire(timeout=REQUEST_TIMEOUT_SECONDS):
            raise too_many_checks()
        try:
            matches = (expected or self._dummy).matches(password)
        finally:
            self.checks_at_once.release()
        if expected is None:
            return "unknown user"
        if not matches:
            return "wrong password for %s" % json.dumps(user)
        with self._lock:
            if len(self._verified) >= VERIFIED_CACHE_ENTRIES:
                self._verified.pop(next(iter(self._verified)))
            self._verified[self._cache_key_of(user, password)] = now + VERIFIED_CACHE_SECONDS
        return None


def _hosts_served(config):
    """The Host names a request may name, or None for any. With a loopback
    bind, only names that mean this machine and the issuer's host: a web page
    whose DNS name is rebound to 127.0.0.1 must not reach the open token
    endpoint. --allowed-host adds names, and turns the check on for any bind.
    IP literals always pass: a rebinding attack needs a name."""
    if not config.allowed_hosts and not is_loopback(config.host):
        return None
    issuer_host = _ABSOLUTE_FORM.fullmatch(config.issuer).group(1)
    return frozenset({"localhost", _host_of(issuer_host)}
                     | {without_root_dot(name.lower()) for name in config.allowed_hosts})


class Issuer(NamedTuple):
    """Everything a reload replaces, with the bytes derived from it: built
    whole by load_issuer and swapped in one assignment, so that a request,
    which reads it once, sees one state from its start to its answer; a
    process forked later starts from the one current then."""

    config: Config
    keys: KeySet
    claims: Claims
    users: Users  # None without --auth-file
    tls_context: ssl.SSLContext  # None without --tls-cert
    discovery_body: bytes
    hosts_served: frozenset  # None: any Host

    @classmethod
    def build(cls, config, keys, claims=NO_CLAIMS, users=None, tls_context=None):
        own = ("iss", "sub") + ("aud",) * bool(config.audience) + (
            "iat", "nbf", "exp", "jti", "client_id") + (SCOPE,) * bool(claims.scope_names)
        discovery = discovery_document(
            config.issuer, dict.fromkeys(own + claims.names), client_auth_methods(config),
            claims.scope_names)
        return cls(config, keys, claims, users, tls_context, json_bytes(discovery),
                   _hosts_served(config))


def client_auth_methods(config):
    """How an OAuth 2.0 client authenticates here (RFC 8414 §2, RFC 8705 §2):
    by a secret of the auth file, else by its certificate, else not at all
    (the open mode, where client_id alone names it). With both files, the
    certificate is asked for as well, by the TLS handshake."""
    if config.auth_file is not None:
        return ("client_secret_basic", "client_secret_post")
    if config.tls_client_ca is not None:
        return ("tls_client_auth",)
    return ("none",)


def _counted(count, noun):
    return "%d %s%s" % (count, noun, "" if count == 1 else "s")


def _subjects(claims):
    return _counted(len(claims.per_subject), "subject") + (
        ' and "*" (everyone)' if claims.everyone else "")


def load_issuer(config, previous=None):
    """(Issuer, what was reloaded, whether the key file loaded) for CONFIG, from
    its files. At start (no PREVIOUS) a bad file is a ConfigError; on a reload
    each bad file keeps what PREVIOUS had, and the log says why. What was
    reloaded is for the log once the Issuer is in use: a line read there is true."""
    reloaded = []

    def keys():
        if previous is None:
            return obtain_keys(config)
        loaded = load_keyset(config.key_path)
        reloaded.append("reloaded keys from %s: signing with kid %s, publishing %s"
                        % (config.key_path, loaded.kid, ", ".join(loaded.kids)))
        return loaded

    def claims():
        if config.claims_file is None:
            return NO_CLAIMS
        loaded = load_claims(config.claims_file)
        reloaded.append("reloaded claims for %s from %s"
                        % (_subjects(loaded), config.claims_file))
        return loaded

    def users():
        if config.auth_file is None:
            return None
        loaded = Users(load_users(config.auth_file))
        reloaded.append("reloaded %s from %s" % (_counted(len(loaded.hashes), "user"),
                                                  config.auth_file))
        return loaded

    def tls_context():
        if config.tls_cert is None:
            return None
        loaded = load_tls_context(config)
        reloaded.append("reloaded the TLS certificate %s" % config.tls_cert)
        return loaded

    parts, keys_loaded = {}, True
    for name, load, kept in (  # the keys last: a start that fails makes no key file
            ("claims", claims, lambda: "claims reload failed, keeping the claims for %s"
             % _subjects(previous.claims)),
            ("users", users, lambda: "auth file reload failed, keeping %s"
             % _counted(len(previous.users.hashes), "user")),
            ("tls_context", tls_context, lambda: "TLS reload failed, keeping the certificate "
                                                 "in use"),
            ("keys", keys, lambda: "key reload failed, still signing with kid %s"
             % previous.keys.kid)):
        try:
            parts[name] = load()
        except Exception as error:
            if previous is None:
                raise
            parts[name] = getattr(previous, name)
            keys_loaded = keys_loaded and name != "keys"
            if isinstance(error, ConfigError):
                log.error("%s: %s", kept(), error)
            else:  # not the file's fault: a fault of ours, to be seen and fixed
                log.error("%s: %s", kept(), error, exc_info=True)
    return Issuer.build(config, **parts), reloaded, keys_loaded


# ---------------------------------------------------------------- the endpoints

def client_key(address):
    """What a client is counted by: the address, or an IPv6 address's /64,
    which one client can otherwise walk through."""
    if ":" not in address:
        return address  # IPv4, already in the one form the socket gives
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network((ip, 64), strict=False))
    return str(ip)


class FailureLimiter:
    """Password guesses, limited before they are checked, in two buckets that
    refill: one per (client address, user) against guessing at one account,
    and a looser one per address against spraying many names. A guess takes
    one from each before the slow hash runs, and a password that checks out
    gives them back: a hundred guesses at once run as many checks as the
    buckets hold, never more. Buckets never go below empty, so a client that
    stops guessing is free again within a refill; a full bucket takes a minute."""

    MAX_BUCKETS = 10000

    def __init__(self, per_user=GUESSES_PER_USER, per_address=GUESSES_PER_ADDRESS):
        self._rules = (per_user, per_address)
        self._buckets = {}  # (address, user) or (address,) -> (level, when)
        self._lock = threading.Lock()

    def _keys(self, address, user):
        return ((address, user), (address,))

    def _level(self, key, rule, now):
        # Guesses race to the lock: one whose clock was read earlier may come
        # later, and must not find the bucket below empty.
        allowed, refill_seconds = rule
        level, when = self._buckets.get(key, (allowed, now))
        return min(allowed, level + max(0.0, now - when) / refill_seconds), max(now, when)

    def take(self, address, user, now):
        """0 when a guess may go ahead (and is counted), else the whole seconds to wait."""
        with self._lock:
            keys = self._keys(address, user)
            levels = [self._level(key, rule, now) for key, rule in zip(keys, self._rules)]
            wait = max(math.ceil((1 - level) * rule[1]) if level < 1 else 0
                       for (level, _), rule in zip(levels, self._rules))
            if wait:
                return wait
            for key, (level, when) in zip(keys, levels):
                self._buckets[key] = (level - 1, when)
            if len(self._buckets) > self.MAX_BUCKETS:  # forget the oldest half
                by_age = sorted(self._buckets, key=lambda k: self._buckets[k][1])
                for old in by_age[:len(by_age) // 2]:
                    del self._buckets[old]
            return 0

    def give_back(self, address, user, now):
        with self._lock:
            for key, rule in zip(self._keys(address, user), self._rules):
                level, when = self._level(key, rule, now)
                self._buckets[key] = (level + 1, when)


def certificate_subject(connection):
    """The common name of a client certificate the TLS handshake verified, or None."""
    getpeercert = getattr(connection, "getpeercert", None)
    certificate = getpeercert() if getpeercert is not None else None
    if not certificate:
        return None
    names = [value for rdn in certificate.get("subject", ()) for key, value in rdn
             if key == "commonName"]
    try:
        return check_user_name(names[0]) if len(names) == 1 else None
    except ValueError:
        return None


class Request(NamedTuple):
    """What an endpoint is given: the request, who sent it, and the Issuer
    and Service it is answered with."""

    head: RequestHead
    body: bytes
    client: str  # the client's address
    connection: socket.socket  # for a TLS client certificate
    issuer: "Issuer"  # read once, when the request came in
    service: "Service"


class Turns:
    """Requests answered one at a time, in the order they were read: a lock
    handed on to the thread that has waited longest. Left to themselves,
    connection threads race for the GIL, which goes to whichever thread the
    scheduler wakes; with 64 connections on one core some requests lost that
    race for 20 to 40 times the median time. The threads are there to wait
    for their clients, not for each other. A thread takes its turn once its
    request is read whole and gives it up before it writes the answer, so a
    turn never waits for a client; a password check, which waits for a slow
    hash that runs without the GIL, steps aside()."""

    def __init__(self):
        self._lock = threading.Lock()
        self._waiting = collections.deque()  # (a held Lock, its thread), in arrival order
        self._holder = None  # the thread whose turn it is

    def __enter__(self):
        me = threading.get_ident()
        with self._lock:
            if self._holder is None:
                self._holder = me
                return self
            turn = threading.Lock()
            turn.acquire()
            self._waiting.append((turn, me))
        turn.acquire()  # until __exit__ hands the turn on to this thread
        return self

    def __exit__(self, *exc_info):
        with self._lock:
            if self._waiting:
                turn, self._holder = self._waiting.popleft()
                turn.release()
            else:
                self._holder = None

    @contextlib.contextmanager
    def aside(self):
        """Others go first meanwhile; then this thread waits for its turn again.
        Outside a turn (a test, the benchmark's handler in memory), nothing."""
        if self._holder != threading.get_ident():
            yield
            return
        self.__exit__()
        try:
            yield
        finally:
            self.__enter__()


class Service:
    """What the endpoints share: the Issuer in use, replaced whole by
    reload(), and what lasts across reloads: the guess limiter, metrics, the
    turns the process's requests take."""

    def __init__(self, issuer, metrics, watcher=None):
        self.issuer = issuer
        self.metrics = metrics
        self.watcher = watcher  # None: only SIGHUP reloads
        self.limiter = FailureLimiter()
        self.turns = Turns()
        self._reload_lock = threading.Lock()

    def forked(self):
        """In a process just forked, where only the forking thread runs: no
        other thread holds the reload lock or a turn."""
        self._reload_lock = threading.Lock()
        self.turns = Turns()

    def files_changed(self):
        """Whether a watched file changed since the last look; said once in the log."""
        changed = self.watcher.changed() if self.watcher is not None else ()
        if changed:
            log.info("%s changed: reloading", ", ".join(changed))
        return bool(changed)

    def reload(self):
        """Read the key, claims, auth and TLS files again (SIGHUP). Each bad one keeps
        what is in use, and the log says why."""
        with self._reload_lock:
            if self.watcher is not None:
                self.watcher.look_now()
            self.issuer, reloaded, keys_loaded = load_issuer(self.issuer.config, self.issuer)
            self.metrics.reloaded(keys_loaded)
            for line in reloaded:
                log.info(line)


CHALLENGE = ("WWW-Authenticate", 'Basic realm="%s", charset="UTF-8"' % REALM)  # RFC 7617 §2.1


def authenticate(request):
    """For POST /auth/token: who is asking, or None when it is open to all.
    With an auth file, the HTTP Basic user; else, with a client CA, the
    client certificate's common name; with both, both are needed and the
    Basic user is the subject."""
    subject = required_certificate(request)
    if request.issuer.users is None:
        return subject
    return password_login(request, basic_credentials(request.head.fields.get("authorization")))


def required_certificate(request):
    """With --tls-client-ca, the name of the client certificate, which is
    required; without, None."""
    if request.issuer.config.tls_client_ca is None:
        return None
    subject = certificate_subject(request.connection)
    if subject is None:
        raise HTTPError(401, "invalid_client", "a client certificate is required")
    return subject


def password_login(request, credentials, failure="no credentials", what="credentials"):
    """The user of CREDENTIALS, (user, password) checked against the auth
    file; or, for them or for FAILURE when there are none, a 401 that says
    no more than "missing or wrong" WHAT, and a log line that says why."""
    if credentials is not None:
        failure = check_password(request.service.limiter, request.issuer.users,
                                 client_key(request.client), *credentials, now=time.monotonic(),
                                 aside=request.service.turns.aside)
    if failure is not None:
        log.info("authentication failed from %s: %s", request.client, failure)
        raise HTTPError(401, "invalid_client", "missing or wrong " + what, headers=[CHALLENGE])
    return credentials[0]


def check_password(limiter, users, address, user, password, now, aside=contextlib.nullcontext):
    """None when the password is the user's, else why not. Credentials that
    checked out lately pass at once; any other guess is counted before its
    slow check, and a client over its allowance gets 429. Other requests go
    first while the slow check runs (ASIDE)."""
    if users.remembers(user, password, now):
        return None
    with aside(), users.one_check_at_a_time(user, password) as first:
        if not first and users.remembers(user, password, now):
            return None  # they checked out while this request waited
        wait = limiter.take(address, user, now)
        if wait:
            raise HTTPError(429, "slow_down", "too many failed logins from this address",
                            headers=[("Retry-After", str(wait))])
        try:
            failure = users.check(user, password, now)
        except HTTPError:  # 503: no check was made, so no guess is counted
            limiter.give_back(address, user, now)
            raise
        if failure is None:
            limiter.give_back(address, user, now)
        return failure


def _media_type(value):
    return value.partition(";")[0].strip().lower()


def _charset(value):
    for parameter in value.split(";")[1:]:
        name, _, setting = parameter.partition("=")
        if name.strip().lower() == "charset":
            return setting.strip().strip('"').lower()
    return None


def issue_token(request):
    """POST /auth/token: the JSON form {"name": ...}, or an OAuth 2.0 client
    credentials grant, by its Content-Type."""
    head = request.head
    content_type = head.fields.get("content-type")
    if content_type is not None and _media_type(content_type) == FORM_TYPE:
        return client_credentials_grant(request, content_type)
    if b"grant_type" in request.body and oauth_sent_as_json(request.body):
        raise oauth_needs_a_form()  # before the credentials, which such a client sends in it
    authenticated = authenticate(request)  # None when the endpoint is open
    if authenticated is None and "content-length" not in head.fields:
        raise HTTPError(411, "invalid_request", "Content-Length is required")
    config = request.issuer.config
    name, audience, ttl, scope = None, config.audience, config.ttl, None
    if request.body or authenticated is None:
        if content_type is not None and _media_type(content_type) != JSON_TYPE:
            raise HTTPError(415, "invalid_request", "Content-Type must be application/json, "
                                                    "or %s for an OAuth 2.0 client" % FORM_TYPE)
        name, audience, ttl, scope = token_body(request.body, audience=audience, ttl=ttl,
                                                name_required=authenticated is None)
    if authenticated is not None and name is not None and name != authenticated:
        raise HTTPError(403, "access_denied", "name must be the authenticated user's")
    sub = authenticated or name
    token = mint(request, sub, audience, ttl, granted_scope(scope, request.issuer.claims.scope(sub)))
    if any(_media_type(accepted) == JSON_TYPE
           for accepted in head.fields.get("accept", "").split(",")):
        body = {"access_token": token, "token_type": "Bearer", "expires_in": ttl}
        return 200, JSON_TYPE, json_bytes(body), NO_STORE
    return 200, "text/plain", token.encode("ascii"), NO_STORE


def client_credentials_grant(request, content_type):
    """RFC 6749 §4.4: a token for the client itself, answered as §5.1 says."""
    if _charset(content_type) not in (None, "utf-8"):
        raise HTTPError(415, "invalid_request", "a form must be UTF-8")
    if "content-length" not in request.head.fields:
        raise HTTPError(411, "invalid_request", "Content-Length is required")
    form = parse_form(request.body)
    query = request.head.target.partition("?")[2]
    if query and "client_secret" in urllib.parse.parse_qs(query, keep_blank_values=True):
        raise HTTPError(400, "invalid_request", "a client secret must not be in the URI "
                                                "(RFC 6749 section 2.3.1), where proxies log it")
    grant_type = form.get("grant_type", [None])[0]
    if grant_type is None:
        raise HTTPError(400, "invalid_request", "grant_type is required")
    if grant_type != CLIENT_CREDENTIALS:
        raise HTTPError(400, "unsupported_grant_type", "this issuer grants %s only, not '%s'"
                        % (CLIENT_CREDENTIALS, _cut(grant_type)))
    if "audience" in form and "resource" in form:
        raise HTTPError(400, "invalid_request", "give audience or resource, not both")
    client = authenticate_client(request, form)  # before what would tell the configuration
    config = request.issuer.config
    parameter = "resource" if "resource" in form else "audience"
    audience = requested_audience(form.get(parameter), config.audience, parameter)
    scope = granted_scope(form.get(SCOPE, [None])[0], request.issuer.claims.scope(client))
    token = mint(request, client, audience, config.ttl, scope, client_id=client)
    body = {"access_token": token, "token_type": "Bearer", "expires_in": config.ttl}
    if scope:
        body[SCOPE] = " ".join(scope)
    return 200, JSON_TYPE, json_bytes(body), NO_STORE


def authenticate_client(request, form):
    """The OAuth 2.0 client of a form request (RFC 6749 §2.3), by one method:
    HTTP Basic or client_id and client_secret in the form, checked against the
    auth file; else its certificate (RFC 8705 §2); else, in the open mode,
    client_id alone. With both files, the certificate is needed as well."""
    issuer = request.issuer
    authorization = request.head.fields.get("authorization")
    client_id, secret = (form.get(name, [None])[0] for name in ("client_id", "client_secret"))
    if authorization is not None and secret is not None:
        raise HTTPError(400, "invalid_request", "a client authenticates one way, not by both "
                                                "the Authorization header and client_secret")
    named = required_certificate(request)  # None without --tls-client-ca
    if issuer.users is None:
        if authorization is not None or secret is not None:
            raise HTTPError(400, "invalid_request", "this issuer checks no client secret (it "
                                                    "has no --auth-file): " + (
                "the certificate names the client" if named is not None
                else "client_id alone names the client"))
        if named is not None:
            if client_id is not None and client_id != named:
                raise HTTPError(401, "invalid_client", "client_id is not the certificate's name")
            return named
        if client_id is None:
            raise HTTPError(400, "invalid_request", "client_id is required")
        problem = subject_problem(client_id)
        if problem:
            raise HTTPError(400, "invalid_request", "client_id " + problem)
        return client_id
    credentials, failure = None, "no credentials"
    if authorization is not None:
        credentials, failure = basic_credentials(authorization), "no Basic credentials"
        try:  # RFC 6749 §2.3.1: the client's id and secret are form-encoded first
            credentials = credentials and tuple(form_decode(part.encode("utf-8"))
                                                for part in credentials)
        except ValueError:  # no user is named: the answer may say what is wrong
            log.info("authentication failed from %s: Basic credentials not form-encoded",
                     request.client)
            raise HTTPError(401, "invalid_client", "the client's id and secret must be "
                            "form-encoded before Basic encodes them (RFC 6749 section 2.3.1)",
                            headers=[CHALLENGE])
        if credentials and client_id is not None and client_id != credentials[0]:
            raise HTTPError(400, "invalid_request", "client_id is not the client of the "
                                                    "Authorization header")
    elif secret is not None:
        if client_id is None:
            raise HTTPError(400, "invalid_request", "client_secret needs a client_id")
        credentials = (client_id, secret)
    return password_login(request, credentials, failure, "client credentials")


def mint(request, sub, audience, ttl, scope, client_id=None):
    """A token for SUB, counted and written to the audit log (by its jti, never itself)."""
    issuer = request.issuer
    config, keys = issuer.config, issuer.keys
    # RFC 7519 §4.1.7: a jti with a "negligible probability" of a repeat: 96 random bits
    claims = make_claims(sub, issuer=config.issuer, audience=audience, ttl=ttl,
                         now=int(time.time()), jti=b64url_encode(os.urandom(12)),
                         client_id=client_id, scope=scope)
    token = keys.sign(claims, issuer.claims.members(sub), access_token=client_id is not None)
    request.service.metrics.token_issued()
    log_line(logging.INFO, "issued sub=%s kid=%s jti=%s exp=%d", _quoted(sub), keys.kid,
             claims["jti"], claims["exp"], held=True)
    return token


def jwks(request):
    return 200, JSON_TYPE, request.issuer.keys.jwks_body, REVALIDATE


def metadata(request):
    return 200, JSON_TYPE, request.issuer.discovery_body, REVALIDATE


def healthz(request):
    return 200, JSON_TYPE, b'{"status":"ok"}', REVALIDATE


def metrics(request):
    issuer = request.issuer
    body = request.service.metrics.render(issuer.keys.kid, issuer.config.workers)
    return 200, "text/plain; version=0.0.4; charset=utf-8", body.encode("utf-8"), REVALIDATE


ROUTES = {
    ("POST", "/auth/token"): issue_token,
    ("GET", "/auth/jwks"): jwks,
    ("GET", "/.well-known/jwks.json"): jwks,
    ("GET", "/.well-known/openid-configuration"): metadata,
    ("GET", "/.well-known/oauth-authorization-server"): metadata,  # RFC 8414 §3
    ("GET", "/healthz"): healthz,
    ("GET", "/metrics"): metrics,
}


def _allowed_methods(routes):
    allowed = {}
    for method, path in routes:
        allowed.setdefault(path, []).extend([method, "HEAD"] if method == "GET" else [method])
    return {path: ", ".join(methods) for path, methods in allowed.items()}


ALLOWED_METHODS = _allowed_methods(ROUTES)  # for the Allow header of a 405


@functools.lru_cache(maxsize=1024)
def _ip_literal(host):
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def dispatch(request):
    """The answer to a request: (status, content type, body, headers), or HTTPError."""
    head, served = request.head, request.issuer.hosts_served
    if served is not None and head.host is not None and head.host not in served \
            and not _ip_literal(head.host):
        raise HTTPError(421, "invalid_request", "this server does not serve the host %s (see "
                                                "--allowed-host)" % head.host[:100])
    method = "GET" if head.method == "HEAD" else head.method
    endpoint = ROUTES.get((method, head.path))
    if endpoint is None:
        allowed = ALLOWED_METHODS.get(head.path)
        if allowed:
            raise HTTPError(405, "method_not_allowed", "this path allows " + allowed,
                            headers=[("Allow", allowed)])
        raise HTTPError(404, "not_found", "no such endpoint")
    return endpoint(request)


# ---------------------------------------------------------------- metrics

def _label(value):  # Prometheus text format: a label value, quoted and escaped
    return '"%s"' % value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Counters for GET /metrics (Prometheus text format 0.0.4), in shared
    memory: an anonymous mmap made before any fork, a row of 64-bit integers
    per process. A process adds to its own row, under its own lock; a scrape
    sums the rows, so every worker answers with the totals of all of them. A
    worker restarted in the same place keeps its row: the counts stay monotonic."""

    ENDPOINTS = tuple(ALLOWED_METHODS) + ("other",)  # every path ROUTES serves
    STATUSES = (200, 400, 401, 403, 404, 405, 411, 413, 414, 415, 421, 429, 431, 500, 503, 505,
                "other")
    BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)  # s
    COUNTERS = (
        ("tokens_issued_total", "Tokens issued."),
        ("key_reloads_total", "Key file reloads, counted in every process that reloads."),
        ("key_reload_failures_total", "Key file reloads that failed, keeping the keys."),
        ("connections_refused_total", "Connections refused with 503: no slot was free and "
                                      "none could be made."),
        ("connections_evicted_total", "Connections closed to make room for a new one."),
        ("log_lines_dropped_total", "Log lines stderr would not take."),
    )
    # A row: the counters, then per endpoint: a count per status, a count per
    # bucket (and +Inf), the summed microseconds.
    _PER_ENDPOINT = len(STATUSES) + len(BUCKETS) + 2
    _ROW = len(COUNTERS) + len(ENDPOINTS) * _PER_ENDPOINT

    def __init__(self, rows=1):
        self._memory = mmap.mmap(-1, 8 * self._ROW * rows)  # MAP_SHARED: forks see it
        self._counts = memoryview(self._memory).cast("q")
        self._rows = rows
        self._counters = {name: i for i, (name, _) in enumerate(self.COUNTERS)}
        self._endpoints = {name: len(self.COUNTERS) + i * self._PER_ENDPOINT
                           for i, name in enumerate(self.ENDPOINTS)}
        self._statuses = {status: i for i, status in enumerate(self.STATUSES)}
        self.use_row(0)

    def use_row(self, row):
        """In a forked process: its own row, and a lock of its own."""
        self._base = row * self._ROW
        self._lock = threading.Lock()

    def count(self, counter):
        i = self._base + self._counters[counter]
        with self._lock:
            self._counts[i] += 1

    def token_issued(self):
        self.count("tokens_issued_total")

    def reloaded(self, ok):
        self.count("key_reloads_total" if ok else "key_reload_failures_total")

    def answered(self, endpoint, status, seconds):
        start = self._endpoints.get(endpoint) or self._endpoints["other"]
        status_offset = self._statuses.get(status, len(self.STATUSES) - 1)
        bucket_offset = len(self.STATUSES) + bisect.bisect_left(self.BUCKETS, seconds)
        i = self._base + start
        with self._lock:
            self._counts[i + status_offset] += 1
            self._counts[i + bucket_offset] += 1
            self._counts[i + self._PER_ENDPOINT - 1] += int(seconds * 1e6)

    def _total(self, offset):
        return sum(self._counts[row * self._ROW + offset] for row in range(self._rows))

    def render(self, kid, workers):
        out = []

        def family(name, kind, text):
            out.append("# HELP jwt_issuer_%s %s\n# TYPE jwt_issuer_%s %s\n"
                       % (name, text, name, kind))

        family("build_info", "gauge", "Version, and the kid signing now.")
        out.append("jwt_issuer_build_info{version=%s,kid=%s} 1\n"
                   % (_label(__version__), _label(kid)))
        family("workers", "gauge", "Processes serving.")
        out.append("jwt_issuer_workers %d\n" % workers)
        for name, text in self.COUNTERS:
            family(name, "counter", text)
            out.append("jwt_issuer_%s %d\n" % (name, self._total(self._counters[name])))
        family("requests_total", "counter", "Requests answered, by endpoint and status.")
        for endpoint, start in self._endpoints.items():
            for status, i in self._statuses.items():
                count = self._total(start + i)
                if count:
                    out.append("jwt_issuer_requests_total{endpoint=%s,status=%s} %d\n"
                               % (_label(endpoint), _label(str(status)), count))
        family("request_duration_seconds", "histogram",
               "From a request's first byte to its answer.")
        for endpoint, start in self._endpoints.items():
            buckets = [self._total(start + len(self.STATUSES) + i)
                       for i in range(len(self.BUCKETS) + 1)]
            if not any(buckets):
                continue
            cumulative = 0
            for bound, count in zip(self.BUCKETS + ("+Inf",), buckets):
                cumulative += count
                out.append("jwt_issuer_request_duration_seconds_bucket{endpoint=%s,le=%s} %d\n"
                           % (_label(endpoint), _label(str(bound)), cumulative))
            out.append("jwt_issuer_request_duration_seconds_sum{endpoint=%s} %.6f\n"
                       % (_label(endpoint), self._total(start + self._PER_ENDPOINT - 1) / 1e6))
            out.append("jwt_issuer_request_duration_seconds_count{endpoint=%s} %d\n"
                       % (_label(endpoint), cumulative))
        return "".join(out)


# ---------------------------------------------------------------- connections: the handler

# What a connection is doing, and how long it may take: the server closes
# one that overstays. A connection waiting (for a TLS handshake or for its
# next request) is the first to give way when connection slots run short.
HANDSHAKE, IDLE, READING, WORKING, WRITING, LINGERING = (
    "handshake", "idle", "reading", "working", "writing", "lingering")
WAITING = (HANDSHAKE, IDLE)
NO_DEADLINE = float("inf")


class Slot:
    """A connection's place among the --max-connections: its client, its
    socket, what it is doing, since when and until when."""

    __slots__ = ("connection", "client", "state", "since", "deadline")

    def __init__(self, connection, client, state=IDLE, seconds=IDLE_TIMEOUT_SECONDS):
        self.connection, self.client = connection, client
        self.enter(state, seconds)

    def enter(self, state, seconds):
        now = time.monotonic()
        self.state, self.since, self.deadline = state, now, now + seconds

    def close(self):
        """From another thread: end the connection; its thread's read or write fails at once."""
        try:
            socket.socket.shutdown(self.connection, socket.SHUT_RDWR)  # not SSLSocket's
        except OSError:
            pass


class Slots:
    """The --max-connections places, held by client address, and who gives
    way when they run short: the address holding the most, with its
    longest-waiting connection, else its slowest (reading or writing for the
    longest). A newcomer from an address that already holds the most may only
    take the place of a waiting connection of its own. While places are free,
    any address may take them all."""

    def __init__(self, limit):
        self.limit = limit
        self._held = set()
        self._per_client = {}  # client key -> places held
        self._changed = threading.Condition()

    def __len__(self):
        return len(self._held)

    def admit(self, slot):
        """SLOT, placed; or the Slot closed to make room for it; or None, no room."""
        with self._changed:
            evicted = slot
            if len(self._held) >= self.limit:
                evicted = self._give_way(slot.client)
                if evicted is None:
                    return None
            self._held.add(slot)
            self._per_client[slot.client] = self._per_client.get(slot.client, 0) + 1
            return evicted

    def _give_way(self, client):
        most = max(self._per_client.values())
        if self._per_client.get(client, 0) >= most:
            candidates = [s for s in self._held if s.client == client and s.state in WAITING]
        else:  # RFC 9112 §9.8: a server may close an idle connection at any time
            candidates = [s for s in self._held
                          if self._per_client[s.client] == most and s.state != WORKING]
        if not candidates:
            return None
        victim = min(candidates, key=lambda s: (s.state not in WAITING, s.since))
        self._remove(victim)
        victim.close()  # under the lock: its descriptor is not closed (and reused) meanwhile
        return victim

    def _remove(self, slot):
        if slot in self._held:
            self._held.discard(slot)
            self._per_client[slot.client] -= 1
            if not self._per_client[slot.client]:
                del self._per_client[slot.client]
            self._changed.notify_all()

    def release(self, slot):
        with self._changed:
            self._remove(slot)

    def close_overdue(self, now):
        with self._changed:
            for slot in self._held:
                if slot.deadline < now:
                    slot.close()

    def hurry_waiting(self, seconds):
        """On stop: a waiting connection has at most SECONDS more."""
        with self._changed:
            for slot in self._held:
                if slot.state in WAITING:
                    slot.deadline = min(slot.deadline, time.monotonic() + seconds)

    def wait_for_change(self, timeout):
        with self._changed:
            self._changed.wait(timeout)


_LOG_ESCAPES = {c: "\\x%02x" % c for c in [*range(0x20), *range(0x7f, 0xa0)]}
_LOG_ESCAPES.update({ord('"'): '\\"', ord("\\"): "\\\\"})
_quoted = json.JSONEncoder().encode  # "...", escaped: one safe token in a log line


# Where a secret can sit in what looks like a request line: user info, a
# query, a fragment, a form's value (the body of a request framed short, read
# as the next request line).
_USER_INFO = re.compile(r"//[^/ ]*@")
_AFTER_MARK = re.compile(r"([?#=]).*?(?= HTTP/[0-9]|$)")


def logged_request_line(head, line=b""):
    """The request line, as far as it was read, escaped for a log line, and
    with what may hold a secret left out: no endpoint reads a query, and
    clients put secrets there (RFC 6749 §2.3.1 forbids it)."""
    if head is not None:
        text = "%s %s %s" % (head.method, head.target, head.version)
    else:
        text = bytes(line.lstrip(b"\r\n").partition(b"\n")[0]).rstrip(b"\r")
        text = text.decode("iso-8859-1") or "-"
    text = text[:MAX_LOGGED_LINE_CHARS]
    if "?" in text or "#" in text or "=" in text or "@" in text:  # rare; the two subs cost 3x the rest
        text = _AFTER_MARK.sub(r"\1...", _USER_INFO.sub("//...@", text))
    return text.translate(_LOG_ESCAPES)


class RequestHandler(socketserver.StreamRequestHandler):
    """One connection: each request read whole (its head by parse_head, its body
    by Content-Length) and answered in one write, while the client keeps the
    connection. Its Slot says what it does; the server holds it to deadlines."""

    rbufsize = 0  # each read is one recv(), into the handler's own buffer
    disable_nagle_algorithm = True  # pipelined answers are not held back

    def __init__(self, request, client_address, server, slot=None):
        self.slot = slot or Slot(request, client_address[0])  # in memory: no server to enforce it
        self.proxy = trusted_proxy(client_address[0], server.trusted_proxies)
        super().__init__(request, client_address, server)

    def handle(self):
        buffer = bytearray()
        try:
            while True:
                try:
                    body = self._read_request(buffer)
                except HTTPError as error:  # the framing is in doubt: answer, then close
                    self._write(self._logged(*error_answer(error), close=True, line=buffer))
                    self._linger()
                    return
                if body is None:
                    return
                self.slot.enter(WORKING, NO_DEADLINE)
                with self.server.service.turns:
                    status, *answer = self._answer(body)
                    close = not self.head.keep_alive or self.server.stopping or status in (411, 500)
                    data = self._logged(status, *answer, close=close)
                self._write(data)
                if status == 411:  # a body may follow that nothing frames: never a request
                    self._linger()
                if close:
                    return
        except OSError:  # the client went away, reset, stalled past a deadline, or broke TLS
            return

    def _read_request(self, buffer):
        """The body of the next request, whose head is then self.head; None
        when the client is done. Reads no more than MAX_HEAD_BYTES of a head,
        and nothing beyond the body it frames until the answer is sent."""
        # self.client: the peer, or, once the head is read, whom a trusted proxy names
        self.head, self.client, slot, server = None, self.client_address[0], self.slot, self.server
        if not buffer:
            slot.enter(IDLE, STOP_GRACE_SECONDS if server.stopping else server.idle_timeout)
            data = self.rfile.read(READ_CHUNK_BYTES)
            if not data:
                return None
            buffer += data
        self.started = time.perf_counter()  # its first byte is in
        head = parse_head(buffer)
        if head is None or head.size + head.content_length > len(buffer):  # not all in yet
            slot.enter(READING, server.request_timeout)
        while head is None:
            data, grown_from = self.rfile.read(READ_CHUNK_BYTES), len(buffer)
            if not data:
                return None
            buffer += data
            # a head can only end or break a rule on a new line, in its first bytes (no
            # method), or as it grows past a limit
            if b"\n" in data or grown_from <= 2 * MAX_EMPTY_LINES or any(
                    grown_from <= limit < len(buffer) for limit in (MAX_REQUEST_LINE_BYTES,
                                                                     MAX_HEAD_BYTES)):
                head = parse_head(buffer)
        del buffer[:head.size]
        self.head = head
        if self.proxy is not None:  # each request: a proxy's connection carries many clients
            self.client = forwarded_client(head.fields, self.proxy, server.trusted_proxies)
        if head.expect_continue and head.content_length > len(buffer):
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # RFC 9110 §10.1.1
        while len(buffer) < head.content_length:
            data = self.rfile.read(READ_CHUNK_BYTES)
            if not data:
                raise HTTPError(400, "invalid_request", "body is shorter than its Content-Length")
            buffer += data
        body = bytes(buffer[:head.content_length])
        del buffer[:head.content_length]
        return body

    def _answer(self, body):
        """(status, content type, body, headers) for the request that was read."""
        service = self.server.service
        try:
            return dispatch(Request(self.head, body, self.client, self.connection,
                                    service.issuer, service))
        except HTTPError as error:
            return error_answer(error)
        except Exception:
            log.exception("internal error answering %s", logged_request_line(self.head))
            return error_answer(HTTPError(500, "server_error", "internal error"))

    def _logged(self, status, content_type, body, headers, close, line=b""):
        """An answer's bytes, logged and counted as answered."""
        head = self.head
        connection = "close" if close else "keep-alive" if head.version == "HTTP/1.0" else None
        answer = render_answer(status, content_type, body, headers, connection,
                               http_date(time.time()), head is None or head.method != "HEAD")
        seconds = time.perf_counter() - self.started
        log_line(logging.INFO, '%s "%s" %d %d %.1fms', self.client,
                 logged_request_line(head, line), status, len(body), seconds * 1000)
        self.server.service.metrics.answered(
            head.path if head is not None and head.path in ALLOWED_METHODS else "other",
            status, seconds)
        return answer

    def _write(self, answer):  # the one place an answer is written: whole, in time
        self.slot.enter(WRITING, self.server.write_timeout)
        self.wfile.write(answer)

    def _linger(self):
        # Closing a socket with unread input sends a reset, which can destroy the error
        # answer before the client reads it: shut down writing, then read what is left.
        self.slot.enter(LINGERING, LINGER_SECONDS)
        try:
            self.connection.shutdown(socket.SHUT_WR)
            while self.rfile.read(READ_CHUNK_BYTES):
                pass
        except OSError:
            pass


# ---------------------------------------------------------------- connections: the server

# A classic BPF socket filter for a listening TCP socket, which sees each
# packet from its TCP header on: drop SYNs, keep the rest (the last ACK of a
# handshake already under way among them).
DROP_SYN = ((0x30, 0, 0, 13),  # ldb [13]: the TCP flags
            (0x45, 0, 1, 0x02),  # jset #SYN: on to the next, else skip it
            (0x06, 0, 0, 0),  # ret #0: drop
            (0x06, 0, 0, 0xFFFFFFFF))  # ret #-1: keep


def refuse_new_connections(listener):
    """From now on LISTENER takes no new connection, while handshakes under way
    complete and wait to be accepted: a client that comes now retries its SYN,
    then finds the port closed (refused, nothing sent), instead of being
    accepted in the moment before the close and then reset. On Linux, a
    socket filter (SO_ATTACH_FILTER, which the kernel copies); elsewhere, the
    moment stays."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        program = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *instruction)
                                                       for instruction in DROP_SYN))
        listener.setsockopt(socket.SOL_SOCKET, 26, struct.pack(
            "HP", len(DROP_SYN), ctypes.addressof(program)))
    except (ImportError, OSError) as error:
        log.warning("new connections may be reset while stopping: %s", error)


_said_at = {}


def now_and_then(what, message, *args):
    """A warning that a flood of the same event makes once in 10 s, not once each."""
    if time.monotonic() - _said_at.get(what, -10.0) >= 10:
        _said_at[what] = time.monotonic()
        log.warning(message + " (said at most every 10 s)", *args)


TOO_BUSY = HTTPError(503, "temporarily_unavailable", "too many connections",
                     headers=[("Retry-After", "1")])


def slot_client(address, trusted_proxies):
    """Whom a connection's slot counts for: its client (client_key), or, for a
    trusted proxy, which carries many clients, each of its connections apart."""
    if trusted_proxy(address[0], trusted_proxies):
        return ("proxied",) + tuple(address)
    return client_key(address[0])


class IssuerServer(ThreadingHTTPServer):
    """The listening socket and a thread per connection, each holding a Slot:
    admission, deadlines and the drain on stop. What is answered is self.service's."""

    daemon_threads = True
    block_on_close = False  # drain() waits for requests in flight, with a deadline
    request_queue_size = LISTEN_BACKLOG
    service, trusted_proxies = None, ()  # set before serving
    idle_timeout, request_timeout, write_timeout = (IDLE_TIMEOUT_SECONDS, REQUEST_TIMEOUT_SECONDS,
                                                     WRITE_TIMEOUT_SECONDS)

    def __init__(self, address, max_connections):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.slots = Slots(max_connections)
        self.stopping = False
        self._next_check = 0.0
        super().__init__(address, RequestHandler)

    def server_bind(self):  # not HTTPServer's: its getfqdn() can stall start-up for seconds
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self):
        host, port = self.server_address[:2]
        return "%s://%s:%d" % (self.service.issuer.config.scheme,
                               "[%s]" % host if ":" in host else host, port)

    def get_request(self):
        try:
            request, client_address = self.socket.accept()
        except OSError as error:
            if error.errno in (errno.EMFILE, errno.ENFILE):
                # The listener stays readable: without a pause, this loop would spin.
                now_and_then("descriptors", "cannot accept connections: %s; raise ulimit -n "
                             "or lower --max-connections", error.strerror)
                time.sleep(TICK_SECONDS)
            raise
        request.setblocking(True)  # not inherited from a non-blocking listener everywhere
        return request, client_address

    def process_request(self, request, client_address):
        """On the accepting thread: a slot and a thread for the connection, or a 503."""
        tls_context = self.service.issuer.tls_context
        if tls_context is not None:
            try:  # no I/O yet: the handshake is the connection thread's
                request = tls_context.wrap_socket(request, server_side=True,
                                                  do_handshake_on_connect=False)
            except (OSError, ValueError):
                return self.shutdown_request(request)
        slot = Slot(request, slot_client(client_address, self.trusted_proxies), *(
            (IDLE, self.idle_timeout) if tls_context is None else (HANDSHAKE, self.request_timeout)))
        evicted = self.slots.admit(slot)
        if evicted is None:
            self.service.metrics.count("connections_refused_total")
            now_and_then("refused", "refused a connection: all %d slots hold requests in "
                         "progress", self.slots.limit)
            if tls_context is None:  # over TLS, a 503 cannot be read before a handshake
                with contextlib.suppress(OSError):
                    request.setblocking(False)  # never wait on the accepting thread
                    request.send(render_answer(*error_answer(TOO_BUSY), "close",
                                               http_date(time.time())))
            return self.shutdown_request(request)
        if evicted is not slot:
            self.service.metrics.count("connections_evicted_total")
        try:
            threading.Thread(target=self.process_request_thread, name="connection",
                             args=(request, client_address, slot), daemon=True).start()
        except BaseException:  # no thread started: nothing else will release the slot
            self.slots.release(slot)
            self.shutdown_request(request)
            raise

    def process_request_thread(self, request, client_address, slot):
        try:
            if slot.state == HANDSHAKE:  # here: on the accepting thread, one would stall all
                try:
                    request.do_handshake()
                except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
                    log.info("TLS handshake with %s failed: %s", client_address[0],
                             getattr(error, "reason", None) or error)
                    return
            self.RequestHandlerClass(request, client_address, self, slot)
        except OSError:
            pass  # the client went away during the handler's setup
        except Exception:
            log.exception("error on a connection from %s", client_address[0])
        finally:
            self.slots.release(slot)  # first: once closed, its descriptor may be reused
            self.shutdown_request(request)

    def service_actions(self):
        """Between accepts, each TICK_SECONDS: close connections past their deadline."""
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + TICK_SECONDS
            self.slots.close_overdue(now)

    def drain(self, timeout, last=True):
        """After serve_forever(): serve what the kernel queued (not reset it), close
        the listener, give waiting connections STOP_GRACE_SECONDS for one last
        request, let requests in flight finish; for at most TIMEOUT seconds. LAST:
        no other process serves this listener, so no handshake may complete late."""
        self.stopping = True
        if last:
            refuse_new_connections(self.socket)
            time.sleep(TICK_SECONDS)  # for handshakes under way to complete
        self.socket.setblocking(False)
        for _ in range(LISTEN_BACKLOG):  # what was queued, not clients that keep coming
            try:
                self.process_request(*self.get_request())
            except OSError:
                break
        self.socket.close()
        self.slots.hurry_waiting(STOP_GRACE_SECONDS)  # and the ones just accepted
        deadline = time.monotonic() + timeout
        while len(self.slots) and time.monotonic() < deadline:
            self.slots.close_overdue(time.monotonic())
            self.slots.wait_for_change(TICK_SECONDS)
        return not len(self.slots)


# ---------------------------------------------------------------- processes: logging

def log_line(level, message, *args, held=False):
    """For the lines every request writes (access, audit): to the issuer's own
    handler, the line itself, without the LogRecord that logging makes and
    formats for each, which cost a token request a fifth of its time; to any
    other handler (a test's), a record. A line HELD goes out with the next
    one, in one write."""
    if not log.isEnabledFor(level):
        return
    handler = log.handlers[0] if len(log.handlers) == 1 else None
    if type(handler) is LogHandler and not (log.filters or handler.filters):
        with handler.lock:  # the time read in turn: lines in the order of their stamps
            handler.write(handler.formatter.line(time.time(), logging.getLevelName(level),
                                                 message % args), held)
    else:
        log.handle(log.makeRecord(log.name, level, __file__, 0, message, args, None,
                                  extra={"held": True} if held else None))


def never_waiting_writer(fd):
    """(fd, write): a way to write to FD's stream that returns at once when the
    stream is full, whatever its reader does: a pipe is opened anew,
    non-blocking (a file description of this process's own: the shell's, or a
    log shipper's, stays as it was); a socket (journald's) is sent to with
    MSG_DONTWAIT. A file or a terminal is written to as it is."""
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISFIFO(mode):
            own = os.open("/proc/self/fd/%d" % fd, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            return own, functools.partial(os.write, own)
        if stat.S_ISSOCK(mode):
            stream = socket.socket(fileno=os.dup(fd))
            return stream.fileno(), lambda data: stream.send(data, socket.MSG_DONTWAIT)
    except (OSError, AttributeError):  # no /proc, no MSG_DONTWAIT: as it is
        pass
    return fd, functools.partial(os.write, fd)


class LogHandler(logging.Handler):
    """Lines to a file descriptor (stderr), each written whole in one write.
    When the stream will not take a line for LOG_WAIT_SECONDS (a log reader
    that stopped reading), the line is dropped and counted in /metrics, as are
    the lines after it without a wait, and one line says how many were lost
    once the stream takes lines again; a line cut short is finished before any
    other. A stalled reader so never holds up a request, or the stop."""

    metrics = None  # counts the lines lost, once the server has its Metrics

    def __init__(self, fd=2):
        super().__init__()
        self.fd, self._send = never_waiting_writer(fd)
        self._held = {}  # thread -> the line it holds for its next: a token's audit line
        self._unfinished = b""  # the rest of a line the stream took only part of
        self._dropped = 0

    def emit(self, record):
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.write(line, record.__dict__.get("held"))  # not getattr(): no exception made

    def write(self, line, held=False):
        """LINE, now or (HELD) with this thread's next one; under self.lock."""
        line, thread = (line + "\n").encode("utf-8", "backslashreplace"), threading.get_ident()
        if held:
            self._held[thread] = self._held.get(thread, b"") + line
            return
        lines = self._held.pop(thread, b"") + line
        if self._unfinished:  # the rest of a line cut short goes first, or nothing does
            self._unfinished = self._write(self._unfinished)
            if self._unfinished:
                return self._drop(lines)
        notice = b""
        if self._dropped:
            notice = (self.format(logging.makeLogRecord({
                "name": log.name, "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": "%d log lines were lost: stderr would not take them",
                "args": (self._dropped,)})) + "\n").encode("utf-8")
        rest = self._write(notice + lines)
        if len(rest) == len(notice) + len(lines):  # the stream took none of it
            return self._drop(lines)
        self._unfinished, self._dropped = rest, 0

    def _write(self, data):
        """What of DATA the stream would not take: b"" when it took it all."""
        view, waited = memoryview(data), bool(self._dropped)
        try:
            while view:
                try:
                    view = view[self._send(view):]
                except BlockingIOError:  # full: wait once, unless lines are being dropped
                    if waited or not select.select([], [self.fd], [], LOG_WAIT_SECONDS)[1]:
                        break
                    waited = True
        except (OSError, ValueError):  # EPIPE; a descriptor select() cannot take
            pass
        return bytes(view)

    def _drop(self, lines):
        self._dropped += lines.count(b"\n")
        if self.metrics is not None:
            for _ in range(lines.count(b"\n")):
                self.metrics.count("log_lines_dropped_total")


class LogFormatter(logging.Formatter):
    """TIME LEVEL [TAG]MESSAGE, and a traceback when there is one; TAG names the
    process with --workers. The time is formatted once a second, not once a line."""

    _stamp = (None, "")  # (second, its text): one tuple, read and replaced whole

    def __init__(self, tag=""):
        super().__init__()
        self.tag = tag

    def format(self, record):
        line = self.line(record.created, record.levelname, record.getMessage())
        return line + "\n" + self.formatException(record.exc_info) if record.exc_info else line

    def line(self, created, levelname, message):
        second, text = self._stamp
        if int(created) != second:  # two threads may both format it: the same text
            second = int(created)
            text = time.strftime(self.default_time_format, self.converter(second))
            self._stamp = (second, text)
        return "%s,%03d %s %s%s" % (text, (created - second) * 1000, levelname, self.tag, message)


def configure_logging(tag=""):
    """Log lines on stderr, as LogFormatter makes them."""
    if not log.handlers:
        # Spare each record the work the logging HOWTO lists as optional
        # (its "Optimization" section): thread and process names.
        logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
        log.addHandler(LogHandler())
        log.setLevel(logging.INFO)
        log.propagate = False
    for handler in log.handlers:
        handler.setFormatter(LogFormatter(tag))


# ---------------------------------------------------------------- processes: signals and workers

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELOAD_SIGNALS = (signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()


def _do_nothing(signum, frame):
    pass


class Signals:
    """Signals as bytes on a pipe (signal.set_wakeup_fd), read by a thread or
    a select() loop, which acts. The handlers take no lock: a signal can come
    while its thread holds one (the logging lock, the one Thread.start takes),
    and a handler that took it again would wait forever. A byte is lost when
    the pipe is full, as a burst of signals can make it: a lost SIGHUP is no
    loss (a full pipe holds others), but a stop must not be lost, so a stop
    signal's handler also sets a flag, one store, seen at the next wait."""

    RELOADED = 0  # not a signal: the byte a thread sends when a reload is done

    def __init__(self, signums):
        self._stopped = self._reloaded = False
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)  # before the handlers
        for signum in signums:
            signal.signal(signum, self._flag_stop if signum in STOP_SIGNALS else _do_nothing)

    def _flag_stop(self, signum, frame):
        self._stopped = True

    def reloaded(self):
        """From the reload thread: wake the loop, which passes the reload on."""
        self._reloaded = True  # seen at the next wait even if the byte is lost
        with contextlib.suppress(OSError):  # full, or closed as the process stops
            os.write(self._write, bytes([self.RELOADED]))

    def wait(self, timeout=TICK_SECONDS):
        """The signals that came since the last call, as a set: waits for one,
        or for TIMEOUT seconds, which bounds how late a stop whose byte was
        lost is seen. The whole pipe is read: a burst is one set."""
        select.select([self._read], [], [], timeout)
        came = set()
        with contextlib.suppress(BlockingIOError):
            while True:
                data = os.read(self._read, 65536)
                if not data:
                    break
                came.update(data)
        if self._stopped:
            came.add(STOP_SIGNALS[0])
        if self._reloaded:
            self._reloaded = False
            came.add(self.RELOADED)
        return came

    def close(self):
        signal.set_wakeup_fd(-1)
        os.close(self._read)
        os.close(self._write)


class Reloader:
    """A thread that reloads SERVICE when asked (SIGHUP) or, with WATCH, when a
    watched file changed; one reload at a time (asks made during one make one
    more), then THEN. Every file this process reads after its start is read
    here: a file that hangs a read, or a look (a FIFO, a mount that stopped
    answering), hangs this thread alone, never the signals or the stop."""

    def __init__(self, service, watch=False, then=None):
        self.busy_since = None  # monotonic time a look or reload began, while one runs
        self._asked = threading.Event()
        interval = service.watcher.interval if watch and service.watcher is not None else None
        threading.Thread(target=self._run, args=(service, interval, then), name="reload",
                         daemon=True).start()

    def request(self):
        self._asked.set()

    def _run(self, service, interval, then):
        while True:
            asked = self._asked.wait(interval)
            self.busy_since = time.monotonic()
            try:
                if asked or service.files_changed():
                    self._asked.clear()
                    service.reload()
                    if then is not None:
                        then()
            except Exception:
                log.exception("reload failed; what is in use stays")
            finally:
                self.busy_since = None


def run_worker(server, service, lifeline=None, ready=None, stale=False):
    """Serve until SIGTERM or SIGINT, then drain; SIGHUP, or a change of a
    watched file, reloads. A worker of --workers also stops when LIFELINE (a
    pipe its supervisor holds open) ends: the supervisor is gone, and with it
    whoever would stop or replace it. Its supervisor watches the files for it. A
    STALE worker, forked while its supervisor was reloading, reloads at once."""
    signals = Signals(STOP_SIGNALS + RELOAD_SIGNALS)
    reloader = Reloader(service, watch=lifeline is None)
    if stale:
        reloader.request()

    def watch():
        while True:
            came = signals.wait()
            if not came.isdisjoint(STOP_SIGNALS):
                server.shutdown()  # waits for serve_forever(): never on its own thread
            elif not came.isdisjoint(RELOAD_SIGNALS):
                reloader.request()

    def watch_lifeline():
        os.read(lifeline, 1)  # nobody writes: this returns when the last writer is gone
        log.error("the supervising process is gone; stopping")
        server.shutdown()

    threading.Thread(target=watch, name="signals", daemon=True).start()
    if lifeline is not None:
        threading.Thread(target=watch_lifeline, name="lifeline", daemon=True).start()
    if hasattr(signal, "pthread_sigmask"):  # blocked across a fork: handled from now on
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS + RELOAD_SIGNALS)
    if ready is not None:
        ready()
    server.serve_forever(poll_interval=TICK_SECONDS)
    if not server.drain(DRAIN_TIMEOUT_SECONDS, last=lifeline is None):
        log.warning("stopping with requests still in flight after %ds", DRAIN_TIMEOUT_SECONDS)
    server.server_close()
    log.info("stopped")
    return 0


def supervise(server, service, count, ready):
    """--workers: fork COUNT workers that serve the socket already bound; start
    another in place of one that dies; on SIGHUP, or a change of a watched
    file, reload here too (on the reload thread), then in every worker (a
    worker forked later starts from what is current); on SIGTERM or SIGINT
    stop them all and wait for them. One loop: signals, dead children and
    finished reloads are read from a pipe, never acted on in a handler."""
    caught = STOP_SIGNALS + RELOAD_SIGNALS + (signal.SIGCHLD,)
    signals = Signals(caught)
    lifeline, held_open = os.pipe()
    # Every worker wakes for a new connection and one gets it: the others'
    # accept() must say EAGAIN (socketserver then waits again), not block.
    server.socket.setblocking(False)
    workers, restarts = {}, {}  # pid -> (number, when started); number -> when to start again
    stopping_since = reloader = None

    def start(number):
        # The child must not run this process's handlers, nor default ones,
        # before it has its own: signals wait, blocked, until run_worker.
        signal.pthread_sigmask(signal.SIG_BLOCK, caught)
        try:
            with warnings.catch_warnings():
                # Python 3.12+ warns of every fork beside another thread. Here that is
                # the reload thread, idle (a fork waits for it) or held up by a file,
                # holding no lock a worker takes: the reload lock is made anew in it.
                warnings.filterwarnings("ignore", r"This process .* is multi-threaded",
                                        DeprecationWarning)
                pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    signals.close()
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    os.close(held_open)
                    configure_logging("worker %d: " % number)
                    service.metrics.use_row(number - 1)
                    service.forked()
                    stale = reloader is not None and reloader.busy_since is not None
                    code = run_worker(server, service, lifeline, stale=stale)
                except BaseException:
                    log.exception("worker %d failed", number)
                finally:
                    os._exit(code)
            workers[pid] = (number, time.monotonic())
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, caught)

    for number in range(1, count + 1):
        start(number)
    log.info("%d workers serving: pids %s", count, ", ".join(str(pid) for pid in workers))
    reloader = Reloader(service, watch=True, then=signals.reloaded)
    ready()
    while workers or (restarts and stopping_since is None):
        now = time.monotonic()
        timeout = TICK_SECONDS
        if restarts and stopping_since is None:
            timeout = min(timeout, max(0.0, min(restarts.values()) - now))
        # What came since the last look, taken together: a stop wins over any
        # reload, and a burst of SIGHUPs is one reload, not one per signal.
        came = signals.wait(timeout)
        if not came.isdisjoint(STOP_SIGNALS) and stopping_since is None:
            stopping_since = time.monotonic()
            restarts.clear()
            refuse_new_connections(server.socket)  # the workers serve what was queued
            server.server_close()
            for pid in workers:
                os.kill(pid, signal.SIGTERM)
        elif not came.isdisjoint(RELOAD_SIGNALS) and stopping_since is None:
            reloader.request()
        if Signals.RELOADED in came and stopping_since is None:
            for pid in workers:
                os.kill(pid, signal.SIGHUP)
        while workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            number, started = workers.pop(pid)
            if stopping_since is None:
                code = os.waitstatus_to_exitcode(status)
                how = "was killed by signal %d" % -code if code < 0 else "exited with status %d" % code
                log.error("worker %d (pid %d) %s; starting another", number, pid, how)
                restarts[number] = max(time.monotonic(), started + RESTART_DELAY_SECONDS)
        now = time.monotonic()
        # A fork while the reload thread works could copy a lock it holds: wait
        # for it, unless a file keeps it waiting (the worker then reloads itself).
        reloading = reloader.busy_since
        if reloading is not None and now - reloading < RESTART_DELAY_SECONDS:
            restarts = {number: max(when, now + TICK_SECONDS) for number, when in restarts.items()}
        for number, when in sorted(restarts.items()):
            if when <= now and stopping_since is None:
                del restarts[number]
                start(number)
        if stopping_since is not None and now - stopping_since > DRAIN_TIMEOUT_SECONDS + 5:
            for pid, (number, _) in workers.items():
                log.error("worker %d (pid %d) is still running; killing it", number, pid)
                os.kill(pid, signal.SIGKILL)
            stopping_since = now  # and wait for them to go
    server.server_close()
    log.info("stopped")
    return 0


def fit_descriptors(config):
    """--max-connections within the descriptor limit (ulimit -n): raise the soft
    limit toward the hard one if need be, else serve fewer connections and say so."""
    try:
        import resource
    except ImportError:
        return config
    needed = config.max_connections + SPARE_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        fitted = max(1, soft - SPARE_DESCRIPTORS)
        log.warning("--max-connections %d does not fit in %d file descriptors (ulimit -n): "
                    "serving %d connections at most", config.max_connections, soft, fitted)
        config = config._replace(max_connections=fitted)
    return config


def startup_warnings(config):
    """What an operator should hear about this configuration at start."""
    warnings = []
    if not is_loopback(config.host):
        if config.auth_file is None and config.tls_client_ca is None:
            warnings.append("listening on %s: anyone who can reach it can mint a token for any "
                            "subject" % config.host)
        if config.auth_file is not None and config.tls_cert is None:
            warnings.append("listening on %s over plain HTTP with --auth-file: passwords cross "
                            "the network in clear; add --tls-cert and --tls-key" % config.host)
    for network in config.trusted_proxies:
        if network.prefixlen == 0:
            warnings.append("--trusted-proxy %s trusts every peer: any client can name the "
                            "address the login limiter counts it by" % network)
    return warnings


def start_server(config):
    """(server, service): bound, with the files loaded; ConfigError if either fails."""
    try:
        server = IssuerServer((config.host, config.port), config.max_connections)
    except (OSError, UnicodeError, TypeError) as error:  # TypeError: a host not UTF-8
        raise ConfigError("cannot listen on %s port %d: %s"
                          % (config.host, config.port,
                             getattr(error, "strerror", None) or error)) from None
    watcher = (FileWatcher(watched_files(config), config.reload_interval)
               if config.reload_interval else None)  # before the first read
    try:  # after the bind: a start that fails there makes no key file
        config = config.bound_to(server.server_address[1])
        issuer, _, _ = load_issuer(config)
    except BaseException:
        server.server_close()
        raise
    if watcher is not None:
        watcher.missing_found()
    metrics = Metrics(config.workers + 1 if config.workers > 1 else 1)
    metrics.use_row(config.workers if config.workers > 1 else 0)  # the supervisor's is last
    server.service = Service(issuer, metrics, watcher)
    server.trusted_proxies = config.trusted_proxies
    return server, server.service


def serve(config):
    configure_logging()
    if config.workers > 1 and not hasattr(os, "fork"):
        log.warning("--workers %d: this platform has no fork(); serving with one process",
                    config.workers)
        config = config._replace(workers=1)
    if config.workers > 1:
        configure_logging("supervisor: ")  # every line of this process, from the first
    server, service = start_server(fit_descriptors(config))
    LogHandler.metrics = service.metrics
    issuer = service.issuer
    config = issuer.config
    log.info("jwt_issuer %s: issuer %s, signing with kid %s, token lifetime %ds%s%s%s%s%s",
             __version__, config.issuer, issuer.keys.kid, config.ttl,
             ", audience " + ", ".join(config.audience) if config.audience else "",
             ", claims for " + _subjects(issuer.claims) if config.claims_file else "",
             ", " + _counted(len(issuer.users.hashes), "user") if issuer.users else "",
             ", client certificates from " + config.tls_client_ca if config.tls_client_ca else "",
             ", %d workers" % config.workers if config.workers > 1 else "")
    for warning in startup_warnings(config):
        log.warning(warning)

    def ready():  # every handler, thread and worker is in place
        print("listening on " + server.url, file=sys.stderr, flush=True)

    if config.workers > 1:
        return supervise(server, service, config.workers, ready)
    return run_worker(server, service, ready=ready)


# ---------------------------------------------------------------- commands and main

class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def build_parser():
    parser = _ArgumentParser(
        prog="jwt_issuer.py",
        description="Mint ES256 JWTs at POST /auth/token and publish the public keys at "
                    "GET /auth/jwks, for Vault/OpenBao jwt auth or any JWKS verifier.",
        epilog="Flags win over the environment; an empty environment variable counts as "
               "unset. Without --auth-file or --tls-client-ca the token endpoint is open: "
               "whoever reaches it can mint a token for any subject, so it listens on "
               "127.0.0.1 unless told otherwise. SIGHUP reloads the key, claims, auth and TLS "
               "files, as a change of one of them does (--reload-interval); SIGTERM and SIGINT "
               "stop gracefully.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    for option in OPTIONS:
        parser.add_argument(option.flag, metavar=option.metavar, dest=option.field,
                            action="append" if option.repeat else "store",
                            help="%s (env %s%s; default %s)" % (
                                option.help, option.env, ", comma-separated" * option.repeat,
                                option.default))
    commands = parser.add_subparsers(dest="command", metavar="COMMAND",
                                     title="commands (instead of serving)")
    genkey = commands.add_parser("genkey", help="write a new P-256 private JWK",
                                 description="Write a new P-256 private JWK to stdout or FILE.")
    genkey.add_argument("-o", "--output", metavar="FILE",
                        help="write to FILE (mode 0600, never over an existing file)")
    pem2jwk = commands.add_parser(
        "pem2jwk", help="convert an EC P-256 PEM private key to a private JWK",
        description="Convert an EC P-256 PEM private key (SEC1 or PKCS#8, as openssl "
                    "writes) to the private JWK a key file holds.")
    pem2jwk.add_argument("file", nargs="?", metavar="FILE", help="PEM file (default: stdin)")
    pem2jwk.add_argument("-o", "--output", metavar="FILE",
                         help="write to FILE (mode 0600, never over an existing file)")
    hash_command = commands.add_parser(
        "hash-password", help="hash a password for --auth-file",
        description="Read a password (twice, without echo, at a terminal; else one line of "
                    "stdin) and print its scrypt hash, or USER:HASH, a line for --auth-file.")
    hash_command.add_argument("user", nargs="?", metavar="USER",
                              help="print USER:HASH rather than the hash alone")
    rotate = commands.add_parser(
        "rotate", help="one step of a two-phase key rotation of a JWK Set file",
        description="One step of a two-phase rotation of the key file FILE, a JWK Set, "
                    "rewritten whole (mode kept): the next key, published since the last step, "
                    "starts signing; the signing key is retired, still published; a new next "
                    "key is published; keys retired at the last step are dropped. The first "
                    "step on a single key only publishes the next key; a missing FILE gets a "
                    "new signing key and a next key. A step that is not yet safe is refused, "
                    "with the time it will be. The issuer takes the new file at its next look "
                    "(--reload-interval, 5 s by default) or on SIGHUP. Give rotate the TTL "
                    "the issuer serves with (--ttl, or JWT_ISSUER_TTL for both).")
    rotate.add_argument("file", metavar="FILE", help="the key file the issuer serves (--key)")
    rotate.add_argument("--publish-ahead", metavar="SECONDS",
                        default=str(DEFAULT_PUBLISH_AHEAD_SECONDS),
                        help="how long a key is published before it may sign (default %d)"
                        % DEFAULT_PUBLISH_AHEAD_SECONDS)
    rotate.add_argument("--retire-after", metavar="SECONDS",
                        help="how long a retired key stays published (default: the TTL, from "
                             "--ttl or JWT_ISSUER_TTL, plus %d)" % ROTATION_MARGIN_SECONDS)
    rotate.add_argument("--ttl", metavar="SECONDS", dest="rotate_ttl",
                        help="the issuer's token lifetime, for the default --retire-after "
                             "(default: JWT_ISSUER_TTL, else %d)" % DEFAULT_TTL_SECONDS)
    rotate.add_argument("--force", action="store_true",
                        help="rotate even when it is not yet safe: tokens may fail to verify")
    return parser


def write_jwk(jwk, output):
    text = json.dumps(jwk, indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        write_new_file(output, text.encode())
        print("wrote %s (kid %s)" % (output, jwk["kid"]), file=sys.stderr)
    return 0


def pem_to_jwk(path):
    if path is None:
        data = sys.stdin.buffer.read(MAX_KEY_FILE_BYTES + 1)
    else:
        data, _ = read_file(path, "PEM file", MAX_KEY_FILE_BYTES)
    try:
        return private_jwk(parse_pem_private_key(data))
    except ValueError as error:
        raise ConfigError("%s: %s" % (path or "stdin", error)) from None


def rotate_key_file(path, publish_ahead, retire_after, force):
    """`rotate`: one step on the key file at PATH (through a symlink, the file
    it names), written whole over it with its mode; a new file has mode 0600."""
    target = os.path.realpath(path)
    with _rotation_lock(os.path.dirname(target)):
        return _rotate(path, target, publish_ahead, retire_after, force)


@contextlib.contextmanager
def _rotation_lock(directory):
    """One rotate at a time in DIRECTORY: a second waits, then reads what the
    first wrote (and is refused as too early), rather than both reading the
    same file and one's next key being lost. A lock on the directory itself:
    no lock file is left beside the key."""
    try:
        import fcntl
        fd = os.open(directory or ".", os.O_RDONLY)
    except (ImportError, OSError):  # no flock here, or no such directory: write_file says so
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _rotate(path, target, publish_ahead, retire_after, force):
    now = int(time.time())
    if not os.path.lexists(path):
        keys = [private_jwk(ec.generate_private_key(P256)) for _ in range(2)]
        keys[0][PUBLISHED_AT] = keys[1][PUBLISHED_AT] = now
        write_file(target, json_bytes({"keys": keys}) + b"\n", install=os.link)
        print("made %s: signing with kid %s; published kid %s as the next key: it may sign "
              "from %s" % (path, keys[0]["kid"], keys[1]["kid"], _utc(now + publish_ahead)),
              file=sys.stderr)
        return 0
    data, status = read_file(target, "key file", MAX_KEY_FILE_BYTES)
    if data.lstrip().startswith(b"-----BEGIN"):
        raise ConfigError("%s is a PEM key, and rotate works on a JWK Set: convert it first, "
                          "python3 jwt_issuer.py pem2jwk %s -o key.json, then serve and rotate "
                          "key.json" % (path, path))
    try:
        parse_key_file(data)  # what the server accepts, and nothing else
        rotated, done, overridden = rotation_step(
            parse_json(data), private_jwk(ec.generate_private_key(P256)), now,
            publish_ahead, retire_after, force)
        text = json.dumps(rotated, indent=2).encode() + b"\n"
        if len(text) > MAX_KEY_FILE_BYTES:
            raise ValueError("rotated, it would be over %d bytes, which the issuer refuses"
                             % MAX_KEY_FILE_BYTES)
        parse_key_file(text)
    except ValueError as error:
        raise ConfigError("key file %s: %s" % (path, error)) from None
    for reason in overridden:
        print("rotating with --force: %s" % reason, file=sys.stderr)
    try:  # who may read the key is kept whole: owner, mode, and an ACL if it has one
        acl = os.getxattr(target, ACL)
    except (AttributeError, OSError):  # no xattrs here, no ACL on the file
        acl = None
    write_file(target, text, stat.S_IMODE(status.st_mode), owner=(status.st_uid, status.st_gid),
               acl=acl)
    print("rotated %s: %s" % (path, "; ".join(done)), file=sys.stderr)
    return 0


def rotate_command(args, environ):
    """`rotate`, its times from its flags; the TTL, for the default --retire-after,
    from its own --ttl or the server's (flag before the command, or environment)."""
    seconds = _integer(0, 10 ** 10)
    ttl_text, source = next(
        ((text, source) for text, source in ((args.rotate_ttl, "--ttl"), (args.ttl, "--ttl"),
                                             (environ.get("JWT_ISSUER_TTL"), "JWT_ISSUER_TTL"))
         if text), (str(DEFAULT_TTL_SECONDS), "--ttl"))
    retire_after = (_integer(1, 10 ** 10)(ttl_text, source) + ROTATION_MARGIN_SECONDS
                    if args.retire_after is None else seconds(args.retire_after, "--retire-after"))
    return rotate_key_file(args.file, seconds(args.publish_ahead, "--publish-ahead"),
                           retire_after, args.force)


def read_password():
    import getpass
    try:
        if sys.stdin.isatty():
            password = getpass.getpass("Password: ")
            if getpass.getpass("Password again: ") != password:
                raise ConfigError("the two passwords differ")
        else:
            line = sys.stdin.buffer.readline().decode("utf-8")
            password = line[:-1] if line.endswith("\n") else line
            password = password[:-1] if password.endswith("\r") else password
    except UnicodeDecodeError:
        raise ConfigError("the password is not UTF-8") from None
    except (EOFError, KeyboardInterrupt) as stop:  # Ctrl-D or Ctrl-C at a prompt
        print(file=sys.stderr)  # off the prompt's line
        raise ConfigError("no password given" if isinstance(stop, EOFError) else "interrupted"
                          ) from None
    if not password:
        raise ConfigError("the password is empty")
    return password


_UNRESERVED = re.compile(r"[A-Za-z0-9._~-]+")  # RFC 3986 §2.3: the same form-encoded or not


def print_password_hash(user):
    if user is not None:
        try:
            check_user_name(user)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    prefix = "" if user is None else user + ":"
    password = read_password()
    print(prefix + hash_password(password, os.urandom(16)))
    if not all(_UNRESERVED.fullmatch(part) for part in (user or "-", password)):
        print("note: OAuth 2.0 clients send a name or secret with characters other than "
              "letters, digits and -._~ two ways in HTTP Basic (RFC 6749 §2.3.1 form-encodes "
              "them; authlib and requests-oauthlib do not): such a client should use "
              "client_secret_post", file=sys.stderr)
    return 0


def main(argv=None, environ=None):
    """The command line; returns the exit status: 0, or 2 for a configuration error."""
    environ = os.environ if environ is None else environ
    try:
        args = build_parser().parse_args(argv)
        if args.command == "genkey":
            return write_jwk(private_jwk(ec.generate_private_key(P256)), args.output)
        if args.command == "pem2jwk":
            return write_jwk(pem_to_jwk(args.file), args.output)
        if args.command == "hash-password":
            return print_password_hash(args.user)
        if args.command == "rotate":
            return rotate_command(args, environ)
        return serve(Config.from_args(args, environ))
    except ConfigError as error:
        print("jwt_issuer: error: %s" % error, file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # before the server's own handlers, or while a command works
        print("jwt_issuer: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
