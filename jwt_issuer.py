#!/usr/bin/env python3
"""jwt_issuer: a small ES256 JWT issuer that publishes its keys as a JWKS.

POST /auth/token {"name": "alice"} answers a JWT for subject "alice", signed
with ES256 (ECDSA on P-256 with SHA-256); GET /auth/jwks publishes the public
key, so that the `jwt` auth method of HashiCorp Vault or OpenBao, or anything
else that checks JWTs against a JWKS URL, can trust the tokens.

One module on the Python 3.9+ standard library and `cryptography`:

    python jwt_issuer.py --help

Copyright (c) 2026 the jwt-issuer authors. MIT licence: see LICENSE.
"""

# The file reads top to bottom: constants, errors, the pure core (base64url
# and JSON, keys, claims and signing, passwords), configuration, files, the
# HTTP edge (endpoints and their ROUTES table, metrics, who may ask, the
# handler and the server), then the commands and main. Its rules:
#   - The pure core takes data and returns data: no socket, clock, file or
#     os.environ inside. The edge passes in the time and the token id.
#   - Every answer leaves through RequestHandler._send; every error a client
#     can cause is an HTTPError, raised where the problem is found.
#   - Nothing secret is logged or served: never a private key's "d", a
#     password or a token (the audit line names its jti).

__version__ = "1.0.0"

import argparse
import base64
import binascii
import bisect
import email.utils
import functools
import io
import ipaddress
import itertools
import json
import logging
import math
import mmap
import os
import re
import signal
import socket
import struct
import socketserver
import ssl
import sys
import threading
import time
from dataclasses import dataclass, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

# Imported where they are used, as a server that does not use them never
# loads them (5 MB and 15 ms of start-up together): getpass (hash-password),
# hashlib and hmac (--auth-file; the stdlib's second OpenSSL), tempfile
# (writing key files), cryptography's serialization (PEM keys).

log = logging.getLogger("jwt_issuer")


# ---------------------------------------------------------------- constants

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_KEY_PATH = "./key.json"
DEFAULT_TTL_SECONDS = 60 * 60

MAX_BODY_BYTES = 4 * 1024
MAX_NAME_CHARS = 256
MAX_REQUEST_LINE_BYTES = 8 * 1024
MAX_FIELD_LINE_BYTES = 8 * 1024
MAX_FIELDS = 100
IDLE_TIMEOUT_SECONDS = 10  # how long a connection may wait for a request; also each write
REQUEST_TIMEOUT_SECONDS = 5  # from a request's first byte to its last, however it trickles in
DRAIN_TIMEOUT_SECONDS = 10  # on SIGTERM, how long requests in flight may take to finish
LINGER_SECONDS = 1  # after an early error answer, how long unread input is drained before closing
LISTEN_BACKLOG = 128  # socketserver's 5 drops SYNs in bursts: clients retry after a whole second
DEFAULT_MAX_CONNECTIONS = 256  # and so at most this many threads serving them
READ_CHUNK_BYTES = 16 * 1024

# P-256 coordinates and private scalars are 32 bytes, always written in full
# (RFC 7518 §6.2.1.2, §6.2.2.1); so are R and S in the signature (§3.4).
P256_BYTES = 32
P256 = ec.SECP256R1()
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # n, SEC 2 §2.4.2
ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())

# Passwords (--auth-file): scrypt, RFC 7914, at 16 MiB and tens of milliseconds a
# check; PBKDF2-SHA256 where this Python's hashlib has no scrypt. Auth files
# with weaker settings than the floors are refused.
SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P = 14, 8, 1
SCRYPT_FLOOR_LOG2_N = 14
PBKDF2_ITERATIONS = 600000
PBKDF2_FLOOR_ITERATIONS = 100000
PASSWORD_CHECKS_AT_ONCE = os.cpu_count() or 2  # each scrypt check holds 16 MiB
VERIFIED_CACHE_SECONDS = 60  # a successful check is reused this long, until any reload
VERIFIED_CACHE_ENTRIES = 1024
FAILURES_ALLOWED = 10  # per client address (an IPv6 /64), then 429 ...
FAILURE_REFILL_SECONDS = 6  # ... and one more each 6 s: a locked address is free within a minute
REALM = "jwt-issuer"

# RFC 7638 thumbprint of key.json.example, which anyone can read: a server
# signing with it (or publishing it) trusts tokens that anyone can forge.
EXAMPLE_KEY_THUMBPRINT = "-1acZp7liNvJSVq6F1Iy3paaPtcojZJSg1ORYtjFCqQ"


# ---------------------------------------------------------------- errors

class ConfigError(Exception):
    """A bad flag, environment value or key file: one line on stderr, exit status 2."""


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


# One compact encoder made once: JSONEncoder.encode() builds a new C encoder
# on every call, which is half the cost of encoding a token's claims.
_compact_json = (json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
                 if json.encoder.c_make_encoder is None else
                 lambda value, encoder=json.encoder.c_make_encoder(
                     None, None, json.encoder.encode_basestring, None, ":", ",", False, False,
                     True): "".join(encoder(value, 0)))


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


def parse_json(data):
    """Strict JSON from bytes: UTF-8, no duplicate member names, no NaN or
    Infinity. Raises ValueError (UnicodeDecodeError is one) with a message."""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_refuse_duplicate_members,
                          parse_constant=_refuse_constant)
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
        elif jwk[name] != expected:
            raise ValueError('"%s" must be "%s", not %s'
                             % (name, expected, json.dumps(jwk[name])[:40]))
    kid = jwk.get("kid")
    if kid is not None and not (isinstance(kid, str) and kid):
        raise ValueError('"kid" must be a non-empty string')
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


@dataclass(frozen=True)
class KeySet:
    """The keys in use, replaced whole on reload: one signs, all are published.

    Rotation: make the key file a JWK Set with the new private key first and
    the old key after it (its public part is enough). Tokens are signed with
    the new key at once, and tokens signed with the old one still verify
    against the JWKS until the old key is taken out of the file."""

    signing_key: ec.EllipticCurvePrivateKey
    kid: str
    kids: tuple  # every published kid, the signing kid first
    header_segment: str  # the JWS protected header, encoded once per key
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
        header = {"alg": "ES256", "typ": "JWT", "kid": kids[0]}
        return cls(signing_key=signing[0], kid=kids[0], kids=kids,
                   header_segment=b64url_encode(json_bytes(header)),
                   jwks_body=json_bytes({"keys": jwks}),
                   uses_example_key=any(thumbprint(jwk) == EXAMPLE_KEY_THUMBPRINT for jwk in jwks))

    def sign(self, claims):
        return sign_jws(self.signing_key, self.header_segment, b64url_encode(json_bytes(claims)))


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
    for number, member in enumerate(members, 1):
        try:
            keys.append(parse_jwk(member))
        except ValueError as error:
            # One bad key in a JWKS breaks every login at Vault: refuse the set.
            raise ValueError("key %d: %s" % (number, error)) from None
    return KeySet.from_keys(keys)


# ---------------------------------------------------------------- the pure core: claims and signing

def make_claims(sub, *, issuer, audience, ttl, now, jti):
    """The JWT claims (RFC 7519 §4.1). One audience is a string, several a list (§4.1.3)."""
    claims = {"iss": issuer, "sub": sub}
    if audience:
        claims["aud"] = audience[0] if len(audience) == 1 else list(audience)
    claims["iat"] = claims["nbf"] = now  # in this order: iat, then nbf
    claims["exp"] = now + ttl
    claims["jti"] = jti
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


_FORBIDDEN_IN_NAME = re.compile("[\x00-\x1f\x7f]")  # C0 controls and DEL
_SURROGATE = re.compile("[\ud800-\udfff]")  # "\ud800" is valid JSON but no Unicode text


def subject_problem(name):
    """Why a string cannot be a token's subject (or a user's name), or None."""
    if not name:
        return "must not be empty"
    if len(name) > MAX_NAME_CHARS:
        return "is longer than %d characters" % MAX_NAME_CHARS
    if _FORBIDDEN_IN_NAME.search(name):
        return "must not contain control characters"
    if _SURROGATE.search(name):
        return "is not valid Unicode"
    return None


def subject_from_body(body, required=True):
    """The "name" of a request body {"name": ...}, checked, or HTTPError 400;
    None where it is absent and not required."""
    try:
        document = parse_json(body)
    except UnicodeDecodeError:
        raise HTTPError(400, "invalid_request", "body is not UTF-8") from None
    except ValueError as error:
        raise HTTPError(400, "invalid_request", "body is not valid JSON: %s" % error) from None
    if not isinstance(document, dict):
        raise HTTPError(400, "invalid_request", "body must be a JSON object")
    name = document.get("name")
    if name is None and not required:
        return None
    if name is None:
        raise HTTPError(400, "invalid_request", "name is required")
    if not isinstance(name, str):
        raise HTTPError(400, "invalid_request", "name must be a string")
    problem = subject_problem(name)
    if problem is not None:
        raise HTTPError(400, "invalid_request", "name " + problem)
    return name


def discovery_document(issuer):
    """OpenID Connect Discovery 1.0 §3, enough for Vault's oidc_discovery_url.
    "issuer" is exactly as configured: Vault compares it byte for byte."""
    base = issuer.rstrip("/")
    return {
        "issuer": issuer,
        "jwks_uri": base + "/auth/jwks",
        "token_endpoint": base + "/auth/token",
        "id_token_signing_alg_values_supported": ["ES256"],
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
    }


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


@dataclass(frozen=True)
class PasswordHash:
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
        if given or len(salt) < 8 or len(digest) < 16:
            raise ValueError("malformed %s settings, salt or hash" % scheme)
        if scheme == "scrypt":
            log2_n, r, p = params
            if not (SCRYPT_FLOOR_LOG2_N <= log2_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16):
                raise ValueError("scrypt settings out of range (ln %d-20, r 1-32, p 1-16)"
                                 % SCRYPT_FLOOR_LOG2_N)
            if not _has_scrypt():
                raise ValueError("this Python's hashlib has no scrypt; use pbkdf2-sha256")
        elif not PBKDF2_FLOOR_ITERATIONS <= params[0] <= 10 ** 8:
            raise ValueError("pbkdf2-sha256 needs %d iterations or more" % PBKDF2_FLOOR_ITERATIONS)
        return cls(scheme, params, salt, digest)

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
        raise ValueError("a user name must be 1-%d characters, with no colon or control "
                         "character" % MAX_NAME_CHARS)
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


# ---------------------------------------------------------------- configuration

ENVIRONMENT = {
    "host": "JWT_ISSUER_HOST",
    "port": "JWT_ISSUER_PORT",
    "key": "JWT_ISSUER_KEY",
    "issuer": "JWT_ISSUER_ISSUER",
    "audience": "JWT_ISSUER_AUDIENCE",
    "ttl": "JWT_ISSUER_TTL",
    "max_connections": "JWT_ISSUER_MAX_CONNECTIONS",
    "workers": "JWT_ISSUER_WORKERS",
    "auth_file": "JWT_ISSUER_AUTH_FILE",
    "tls_cert": "JWT_ISSUER_TLS_CERT",
    "tls_key": "JWT_ISSUER_TLS_KEY",
    "tls_client_ca": "JWT_ISSUER_TLS_CLIENT_CA",
}


def is_decimal(text):
    """ASCII digits only: int() would also take " 5", "1_0" and other scripts' digits."""
    return text.isascii() and text.isdigit()


def _integer(text, source, low, high):
    if not (is_decimal(text) and len(text) <= 11 and low <= int(text) <= high):
        raise ConfigError("%s must be an integer from %d to %d, not %s"
                          % (source, low, high, json.dumps(text)[:40]))
    return int(text)


@dataclass(frozen=True)
class Config:
    """Everything the server is told, checked once; the flags win over the environment."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    key_path: str = DEFAULT_KEY_PATH
    key_path_given: bool = False  # a key named on purpose must exist; the default is made
    issuer: str = None  # None until the port is bound: then http(s)://localhost:PORT
    audience: tuple = ()
    ttl: int = DEFAULT_TTL_SECONDS
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    workers: int = 1  # processes, forked after the bind
    auth_file: str = None  # users and password hashes: POST /auth/token needs HTTP Basic
    tls_cert: str = None  # with tls_key: HTTPS
    tls_key: str = None
    tls_client_ca: str = None  # POST /auth/token needs a client certificate from this CA

    def __post_init__(self):
        if not self.host:
            raise ConfigError("host must not be empty (0.0.0.0 listens on every IPv4 address)")
        if not self.key_path:
            raise ConfigError("key file name must not be empty")
        if self.issuer is not None:
            url = urlsplit(self.issuer)
            # OpenID Connect Discovery §3: https (http here for local use), no query or fragment.
            if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
                raise ConfigError("issuer must be an http(s) URL with a host and no query or "
                                  "fragment, not %s" % json.dumps(self.issuer))
        if any(not isinstance(aud, str) or not aud.strip() for aud in self.audience):
            raise ConfigError("an audience must be a non-empty string")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")

    @property
    def scheme(self):
        return "http" if self.tls_cert is None else "https"

    @classmethod
    def from_args(cls, args, environ):
        """From parsed flags (None where not given) and an environment mapping."""
        def setting(name):  # an empty environment variable counts as unset
            flag = getattr(args, name)
            if flag is not None:
                return flag, "--" + name.replace("_", "-")
            return environ.get(ENVIRONMENT[name]) or None, ENVIRONMENT[name]

        values = {}
        host, _ = setting("host")
        if host is not None:
            values["host"] = host
        port, source = setting("port")
        if port is not None:
            values["port"] = _integer(port, source, 0, 65535)
        ttl, source = setting("ttl")
        if ttl is not None:
            values["ttl"] = _integer(ttl, source, 1, 10 ** 10)
        max_connections, source = setting("max_connections")
        if max_connections is not None:
            values["max_connections"] = _integer(max_connections, source, 1, 100000)
        workers, source = setting("workers")
        if workers is not None:
            values["workers"] = _integer(workers, source, 1, 64)
        for name in ("auth_file", "tls_cert", "tls_key", "tls_client_ca"):
            path, source = setting(name)
            if path == "":
                raise ConfigError("%s must name a file" % source)
            if path is not None:
                values[name] = path
        key_path, _ = setting("key")
        if key_path is not None:
            values.update(key_path=key_path, key_path_given=True)
        issuer, _ = setting("issuer")
        if issuer is not None:
            values["issuer"] = issuer
        if args.audience is not None:
            values["audience"] = tuple(args.audience)
        else:
            listed = environ.get(ENVIRONMENT["audience"], "")
            values["audience"] = tuple(aud.strip() for aud in listed.split(",") if aud.strip())
        return cls(**values)


# ---------------------------------------------------------------- files

def write_new_file(path, data):
    """Write data to a new file, mode 0600, all or nothing, never over an
    existing file: a temp file in the same directory, fsync, then link(),
    which unlike rename() fails if the name is taken."""
    import tempfile
    directory = os.path.dirname(path) or "."
    try:
        fd, temp_path = tempfile.mkstemp(dir=directory, prefix=".jwt_issuer-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as temp:
                temp.write(data)
                temp.flush()
                os.fsync(temp.fileno())
            os.link(temp_path, path)
        finally:
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


def _warn_if_others_can_read(kind, path, mode):
    if mode & 0o077:
        log.warning("%s %s can be read by group or others (mode %04o): chmod 600 %s",
                    kind, path, mode & 0o7777, path)


def load_keyset(path):
    """Read and check a key file; ConfigError names the file and the problem."""
    try:
        with open(path, "rb") as key_file:
            data = key_file.read(1024 * 1024)
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ConfigError("key file %s does not exist" % path) from None
    except OSError as error:
        raise ConfigError("cannot read key file %s: %s" % (path, error.strerror or error)) from None
    try:
        keys = parse_key_file(data)
    except ValueError as error:
        raise ConfigError("key file %s: %s" % (path, error)) from None
    _warn_if_others_can_read("key file", path, mode)
    if keys.uses_example_key:
        log.warning("THE KEY IN %s IS THE PUBLIC EXAMPLE KEY OF key.json.example: ANYONE CAN "
                    "FORGE TOKENS THAT VERIFY AGAINST THIS JWKS. Make your own: "
                    "python jwt_issuer.py genkey -o key.json", path)
    return keys


def load_users(path):
    """{user: PasswordHash} from an auth file; ConfigError names the file, the line, the problem."""
    try:
        with open(path, "rb") as auth_file:
            text = auth_file.read(16 * 1024 * 1024).decode("utf-8")
        mode = os.stat(path).st_mode
    except UnicodeDecodeError:
        raise ConfigError("auth file %s is not UTF-8" % path) from None
    except OSError as error:
        raise ConfigError("cannot read auth file %s: %s"
                          % (path, error.strerror or error)) from None
    try:
        users = parse_auth_file(text)
    except ValueError as error:
        raise ConfigError("auth file %s %s" % (path, error)) from None
    if not users:
        raise ConfigError("auth file %s has no users: no one could get a token" % path)
    _warn_if_others_can_read("auth file", path, mode)
    return users


def load_tls_context(config):
    """TLS 1.2 and up with the ssl module's defaults; with a client CA, the
    handshake asks for a client certificate (and checks one that comes) but
    does not demand one: verifiers fetch the JWKS without."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError("cannot load the TLS certificate %s and key %s: %s" % (
            config.tls_cert, config.tls_key, getattr(error, "strerror", None) or error)) from None
    if config.tls_client_ca is not None:
        try:
            context.load_verify_locations(config.tls_client_ca)
        except (OSError, ssl.SSLError) as error:
            raise ConfigError("cannot load the client CA %s: %s" % (
                config.tls_client_ca, getattr(error, "strerror", None) or error)) from None
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


# ---------------------------------------------------------------- the HTTP edge: endpoints

class TokenIds:
    """jti values (RFC 7519 §4.1.7: unique, "negligible probability" of a
    repeat): 96 random bits for this process, then a counter. A third of the
    cost of fresh randomness per token. A forked worker draws bits of its own,
    or two workers would hand out the same ids."""

    def __init__(self):
        self._start()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._start)

    def _start(self):
        self._prefix = b64url_encode(os.urandom(12))  # 16 characters, so prefix and count
        self._count = itertools.count()  # cannot run into each other

    def __call__(self):
        return "%s%x" % (self._prefix, next(self._count))  # next() on a count is atomic


JSON_TYPE = "application/json"
NO_STORE = (("Cache-Control", "no-store"), ("Pragma", "no-cache"))  # RFC 6749 §5.1
REVALIDATE = (("Cache-Control", "no-cache"),)  # keys may rotate at any SIGHUP


WRITTEN_WITH_THE_NEXT_LINE = {"flush": False}  # the audit line waits for the access line
_quoted = json.encoder.encode_basestring_ascii  # "...", escaped: one safe token in a log line


def _media_type(value):
    return value.partition(";")[0].strip().lower()


def issue_token(request):
    server = request.server
    authenticated = server.authenticate(request)  # None when the endpoint is open
    if authenticated is None and request.headers.get("Content-Length") is None:
        raise HTTPError(411, "invalid_request", "Content-Length is required")
    name = None
    if request.body or authenticated is None:
        content_type = request.headers.get("Content-Type")
        if content_type is not None and _media_type(content_type) != JSON_TYPE:
            raise HTTPError(415, "invalid_request", "Content-Type must be application/json")
        name = subject_from_body(request.body, required=authenticated is None)
    if authenticated is not None and name is not None and name != authenticated:
        raise HTTPError(403, "access_denied", "name must be the authenticated user's")
    sub = authenticated or name
    keys, config = server.keys, server.config
    claims = make_claims(sub, issuer=config.issuer, audience=config.audience, ttl=config.ttl,
                         now=int(time.time()), jti=server.token_ids())
    token = keys.sign(claims)
    server.metrics.token_issued()
    log.info("issued sub=%s kid=%s jti=%s exp=%d", _quoted(sub), keys.kid, claims["jti"],
             claims["exp"], extra=WRITTEN_WITH_THE_NEXT_LINE)
    if any(_media_type(accepted) == JSON_TYPE
           for accepted in request.headers.get("Accept", "").split(",")):
        body = {"access_token": token, "token_type": "Bearer", "expires_in": config.ttl}
        return 200, JSON_TYPE, json_bytes(body), NO_STORE
    return 200, "text/plain", token.encode("ascii"), NO_STORE


def jwks(request):
    return 200, JSON_TYPE, request.server.keys.jwks_body, REVALIDATE


def openid_configuration(request):
    return 200, JSON_TYPE, request.server.discovery_body, REVALIDATE


def healthz(request):
    return 200, JSON_TYPE, b'{"status":"ok"}', REVALIDATE


def metrics(request):
    server = request.server
    body = server.metrics.render(server.keys.kid, server.config.workers).encode("utf-8")
    return 200, "text/plain; version=0.0.4; charset=utf-8", body, REVALIDATE


ROUTES = {
    ("POST", "/auth/token"): issue_token,
    ("GET", "/auth/jwks"): jwks,
    ("GET", "/.well-known/jwks.json"): jwks,
    ("GET", "/.well-known/openid-configuration"): openid_configuration,
    ("GET", "/healthz"): healthz,
    ("GET", "/metrics"): metrics,
}


def _allowed_methods(routes):
    allowed = {}
    for method, path in routes:
        allowed.setdefault(path, []).extend([method, "HEAD"] if method == "GET" else [method])
    return {path: ", ".join(methods) for path, methods in allowed.items()}


ALLOWED_METHODS = _allowed_methods(ROUTES)  # for the Allow header of a 405


# ---------------------------------------------------------------- the HTTP edge: metrics

def _label(value):  # Prometheus text format: a label value, quoted and escaped
    return '"%s"' % value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Counters for GET /metrics (Prometheus text format 0.0.4), in shared
    memory: an anonymous mmap made before any fork, a row of 64-bit integers
    per worker. A worker adds to its own row, under its own lock; a scrape sums
    the rows, so every worker answers with the totals of all of them. A worker
    restarted in the same slot keeps its row, and the counts stay monotonic."""

    ENDPOINTS = tuple(ALLOWED_METHODS) + ("other",)  # every path ROUTES serves
    STATUSES = (200, 400, 401, 403, 404, 405, 411, 413, 414, 415, 429, 431, 500, 503, 505,
                "other")
    BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)  # s
    # A row: tokens, reloads, reload failures, refused connections, then per
    # endpoint: a count per status, a count per bucket (and +Inf), the summed
    # microseconds.
    _PER_ENDPOINT = len(STATUSES) + len(BUCKETS) + 2
    _ROW = 4 + len(ENDPOINTS) * _PER_ENDPOINT

    def __init__(self, rows=1):
        self._memory = mmap.mmap(-1, 8 * self._ROW * rows)  # MAP_SHARED: forks see it
        self._counts = memoryview(self._memory).cast("q")
        self._rows = rows
        self._endpoints = {name: 4 + i * self._PER_ENDPOINT
                           for i, name in enumerate(self.ENDPOINTS)}
        self._statuses = {status: i for i, status in enumerate(self.STATUSES)}
        self.use_row(0)

    def use_row(self, row):
        """In a worker, after the fork: its own row, and a lock of its own."""
        self._base = row * self._ROW
        self._lock = threading.Lock()

    def _add(self, offset, amount=1):
        with self._lock:
            self._counts[self._base + offset] += amount

    def token_issued(self):
        self._add(0)

    def reloaded(self, ok):
        self._add(1 if ok else 2)

    def refused(self):
        self._add(3)

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
        for offset, name, text in ((0, "tokens_issued_total", "Tokens issued."),
                                   (1, "key_reloads_total", "Key file reloads (one per worker "
                                                            "per SIGHUP)."),
                                   (2, "key_reload_failures_total", "Key file reloads that "
                                                                    "failed, keeping the keys."),
                                   (3, "connections_refused_total", "Connections refused with "
                                                                    "503 at --max-connections.")):
            family(name, "counter", text)
            out.append("jwt_issuer_%s %d\n" % (name, self._total(offset)))
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


# ---------------------------------------------------------------- the HTTP edge: who may ask

def client_key(address):
    """What failed logins are counted by: the address, or an IPv6 address's /64,
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
    """Failed logins per client address: a bucket of `allowed` that refills one
    every `refill_seconds`. An empty bucket is a 429 before any password is
    checked; other addresses, a real user's among them, are not affected, and
    an address that stops failing is free again within a minute."""

    MAX_ADDRESSES = 10000

    def __init__(self, allowed=FAILURES_ALLOWED, refill_seconds=FAILURE_REFILL_SECONDS):
        self.allowed, self.refill_seconds = allowed, refill_seconds
        self._buckets = {}  # client key -> (level, when)
        self._lock = threading.Lock()

    def _level(self, key, now):
        level, when = self._buckets.get(key, (self.allowed, now))
        return min(self.allowed, level + (now - when) / self.refill_seconds)

    def retry_after(self, key, now):
        """0, or the whole seconds until this client may try again."""
        with self._lock:
            missing = 1 - self._level(key, now)
        return 0 if missing <= 0 else math.ceil(missing * self.refill_seconds)

    def failed(self, key, now):
        with self._lock:
            self._buckets[key] = (self._level(key, now) - 1, now)
            if len(self._buckets) > self.MAX_ADDRESSES:  # forget the oldest half
                by_age = sorted(self._buckets, key=lambda k: self._buckets[k][1])
                for old in by_age[:len(by_age) // 2]:
                    del self._buckets[old]


class Authenticator:
    """HTTP Basic (RFC 7617) against an auth file's users.

    An unknown user costs a slow hash too (a dummy one), so that the answer and
    its time are the same as for a wrong password. A successful check is kept
    for VERIFIED_CACHE_SECONDS under an HMAC of the credentials with a key of
    this process's, so a busy client does not pay a slow hash per token and no
    password is kept; a reload makes a new Authenticator, with an empty cache."""

    def __init__(self, users, checks_at_once):
        self.users = users
        self._checks_at_once = checks_at_once  # a semaphore: each scrypt check holds 16 MiB
        import hmac
        self._keyed_hash = hmac.digest
        self._cache_key = os.urandom(32)
        self._verified = {}  # HMAC of the credentials -> when it expires
        self._lock = threading.Lock()
        self._dummy = PasswordHash.parse(hash_password(b64url_encode(os.urandom(16)),
                                                       os.urandom(16)))

    def check(self, user, password, now):
        """None when the credentials are good, else why not (for the log)."""
        user_bytes = user.encode("utf-8")  # length-prefixed: user and password cannot blur
        credentials = b"%d:%s%s" % (len(user_bytes), user_bytes, password.encode("utf-8"))
        cache_key = self._keyed_hash(self._cache_key, credentials, "sha256")
        expires = self._verified.get(cache_key)
        if expires is not None and expires > now:
            return None
        expected = self.users.get(user)
        if not self._checks_at_once.acquire(timeout=REQUEST_TIMEOUT_SECONDS):
            raise HTTPError(503, "temporarily_unavailable", "too many password checks at once",
                            headers=[("Retry-After", "1")])
        try:
            matches = (expected or self._dummy).matches(password)
        finally:
            self._checks_at_once.release()
        if expected is None:
            return "unknown user"
        if not matches:
            return "wrong password for %s" % json.dumps(user)
        with self._lock:
            if len(self._verified) >= VERIFIED_CACHE_ENTRIES:
                self._verified.pop(next(iter(self._verified)))
            self._verified[cache_key] = now + VERIFIED_CACHE_SECONDS
        return None


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


CHALLENGE = ("WWW-Authenticate", 'Basic realm="%s", charset="UTF-8"' % REALM)  # RFC 7617 §2.1


# ---------------------------------------------------------------- the HTTP edge: the handler

REASONS = {status.value: status.phrase for status in HTTPStatus}
ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 500: "server_error"}
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2: methods, field names
_HTTP_VERSION = re.compile(r"HTTP/([0-9])\.([0-9])")  # RFC 9112 §2.3
_NOT_IN_FIELD_VALUE = re.compile("[\x00-\x08\x0a-\x1f\x7f]")  # controls but HTAB (RFC 9110 §5.5)
_NOT_IN_DESCRIPTIONS = re.compile(r'[^\x20-\x21\x23-\x5b\x5d-\x7e]')  # RFC 6749 §5.2
_LOG_ESCAPES = {c: "\\x%02x" % c for c in [*range(0x20), *range(0x7f, 0xa0)]}
_LOG_ESCAPES.update({ord('"'): '\\"', ord("\\"): "\\\\"})
_date_cache = (0, "")


def http_date(now):
    """RFC 9110 §6.6.1 Date, formatted once a second."""
    global _date_cache
    second = int(now)
    if _date_cache[0] != second:
        _date_cache = (second, email.utils.formatdate(second, usegmt=True))
    return _date_cache[1]


def request_path(target):
    """The path of an origin-form or absolute-form request target (RFC 9112 §3.2)."""
    if target.startswith("/"):
        return target.partition("?")[0]
    if target.lower().startswith(("http://", "https://")):
        return urlsplit(target).path or "/"
    return target


# Errors that mean the client went away or stalled: the connection just ends.
CLIENT_GONE = (ConnectionError, socket.timeout, BlockingIOError)


class SocketTimeouts:
    """A connection's read and write timeouts. On a plain TCP socket they are
    the kernel's (SO_RCVTIMEO, SO_SNDTIMEO) on a blocking socket: with
    Python's own, every recv() and send() is preceded by a poll(), two more
    system calls per request. A TLS socket keeps Python's. Set only when
    they change: each change is a system call too."""

    def __init__(self, connection, seconds):
        self._connection = connection
        self._in_kernel = (not isinstance(connection, ssl.SSLSocket)
                           and hasattr(socket, "SO_RCVTIMEO") and sys.platform != "win32"
                           and hasattr(connection, "setblocking"))
        self._reading = None
        if self._in_kernel:
            connection.setblocking(True)
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self._timeval(seconds))
        self.set_read(seconds)

    @staticmethod
    def _timeval(seconds):
        whole = int(seconds)
        return struct.pack("ll", whole, int((seconds - whole) * 1e6))

    def set_read(self, seconds):
        if seconds == self._reading:
            return
        self._reading = seconds
        if self._in_kernel:
            self._connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                        self._timeval(max(seconds, 0.001)))
        else:
            self._connection.settimeout(seconds)


class RequestReader:
    """A connection's input, read against two clocks: a connection may wait
    idle_timeout for a request; once the request's first byte is in, all of
    it (line, headers, body) must arrive within request_timeout. A client that
    sends half a request and stalls, or drips it a byte at a time, is dropped
    in seconds (socket.timeout), whatever each single read does."""

    def __init__(self, timeouts, raw):
        self._timeouts = timeouts
        self._raw = raw  # unbuffered: every read() is one recv()
        self._buffer = bytearray()
        self._deadline = None

    def wait_for_request(self, idle_timeout, request_timeout):
        """False at the end of the input; else the request clock runs."""
        self._deadline = None
        self._timeouts.set_read(idle_timeout)
        if not self._buffer and not self._fill():
            return False
        self._deadline = time.monotonic() + request_timeout
        return True

    def end_request(self, timeout):
        """The request is read: back to one timeout per read."""
        self._deadline = None
        self._timeouts.set_read(timeout)

    def _fill(self):
        if self._deadline is not None:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("request not complete in time")
            self._timeouts.set_read(remaining)
        data = self._raw.read(READ_CHUNK_BYTES)
        if data is None:  # EAGAIN: the kernel's read timeout ran out
            raise socket.timeout("read timed out")
        if not data:
            return False
        self._buffer += data
        return True

    def _take(self, size):
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def readline(self, limit=-1):
        limit = limit if limit >= 0 else sys.maxsize
        start = 0
        while True:
            end = self._buffer.find(b"\n", start, limit)
            if end >= 0:
                return self._take(end + 1)
            if len(self._buffer) >= limit:
                return self._take(limit)
            start = len(self._buffer)
            if not self._fill():
                return self._take(len(self._buffer))

    def read(self, size):
        while len(self._buffer) < size and self._fill():
            pass
        return self._take(size)

    def whole_head(self):
        """The head's lines as text, if all of it is in already and every line
        ends in CRLF (the usual case, taken whole); else None, and nothing read."""
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(self._buffer[:end])
        if head.count(b"\n") != head.count(b"\r\n"):  # a bare LF: line by line, then
            return None
        del self._buffer[:end + 4]
        return head.decode("iso-8859-1").split("\r\n")

    def close(self):
        self._raw.close()


class HeaderFields:
    """A request's header fields, found by name without regard to case."""

    def __init__(self, fields):
        self._fields = fields
        self._by_name = {}
        for name, value in fields:
            self._by_name.setdefault(name.lower(), []).append(value)

    def get(self, name, default=None):
        values = self._by_name.get(name.lower())
        return values[0] if values else default

    def get_all(self, name):
        return self._by_name.get(name.lower(), [])

    def __contains__(self, name):
        return name.lower() in self._by_name

    def items(self):
        return list(self._fields)


@functools.lru_cache(maxsize=256)
def _head_template(status, content_type, headers, connection):
    """A response head with %s for the Date and %d for the Content-Length:
    the rest of it is the same for every answer of this kind."""
    lines = ["HTTP/1.1 %d %s" % (status, REASONS[status]), "Date: %s",
             "Content-Type: " + content_type.replace("%", "%%"), "Content-Length: %d",
             "X-Content-Type-Options: nosniff"]
    lines.extend(("%s: %s" % header).replace("%", "%%") for header in headers)
    if connection is not None:
        lines.append("Connection: " + connection)
    return "\r\n".join(lines) + "\r\n\r\n"


class RequestHandler(BaseHTTPRequestHandler):
    """One connection: HTTP/1.1 keep-alive, each answer written in one send."""

    protocol_version = "HTTP/1.1"
    timeout = None  # SocketTimeouts sets them
    disable_nagle_algorithm = True
    rbufsize = 0  # RequestReader does the buffering
    body = b""
    started = 0.0
    endpoint = "other"  # for the metrics: a known path, or "other"

    def setup(self):
        super().setup()
        timeouts = SocketTimeouts(self.connection, self.server.idle_timeout)
        self.rfile = RequestReader(timeouts, self.rfile)
        self.idle = True
        self.idle_since = time.monotonic()
        self.linger = False  # unread input is left: drain it before closing
        self.server.track(self, True)

    def finish(self):
        try:
            if self.linger:
                self._drain_input()
            super().finish()
        finally:
            self.server.track(self, False)

    def handle(self):
        self.close_connection = True
        self.handle_one_request()
        while not self.close_connection:
            self.idle_since = time.monotonic()
            self.idle = True  # before the check: drain() reads them in the other order
            if self.server.stopping:
                break
            self.handle_one_request()

    def handle_one_request(self):
        # The stdlib's version, with the request clock, a request head read by
        # _read_head, and every method going to _answer (a 405 or 404, never a 501).
        self.command, self.request_version, self.requestline = "", "HTTP/1.1", ""
        self.body, self.endpoint = b"", "other"
        server = self.server
        try:
            if not self.rfile.wait_for_request(server.idle_timeout, server.request_timeout):
                self.close_connection = True
                return
            self.idle = False
            self.started = time.perf_counter()
            self._answer()
        except socket.timeout:
            self.close_connection = True  # a slow or idle client: drop it quietly

    def _answer(self):
        try:
            self._read_head()
            self.body = self._read_body()  # first, whatever the path: it frames the next request
            self.rfile.end_request(self.server.idle_timeout)
            path = request_path(self.path)
            if path in ALLOWED_METHODS:
                self.endpoint = path
            method = "GET" if self.command == "HEAD" else self.command
            endpoint = ROUTES.get((method, path))
            if endpoint is None:
                allowed = ALLOWED_METHODS.get(path)
                if allowed:
                    raise HTTPError(405, "method_not_allowed", "this path allows " + allowed,
                                    headers=[("Allow", allowed)])
                raise HTTPError(404, "not_found", "no such endpoint")
            self._send(*endpoint(self))
        except HTTPError as error:
            self._send_error(error)
        except CLIENT_GONE:
            raise
        except Exception:
            log.exception("internal error answering %s", self._logged_requestline())
            self.close_connection = True
            self._send_error(HTTPError(500, "server_error", "internal error"))

    def _read_line(self, limit, status, description):
        line = self.rfile.readline(limit + 1)
        if len(line) > limit:
            raise self._framing_error(status, description)
        if not line.endswith(b"\n"):
            raise ConnectionAbortedError("the client closed the connection mid-request")
        return line[:-2] if line.endswith(b"\r\n") else line[:-1]  # RFC 9112 §2.2: LF alone too

    def _framing_error(self, status, description):
        # The rest of the request is unread: answer, drain it, close.
        self.close_connection = self.linger = True
        return HTTPError(status, "invalid_request", description)

    def _read_head(self):
        """The request line and header fields, strictly (RFC 9112 §2-§5). The
        stdlib's email-based parser ends the header section at a malformed
        field line instead, and a Content-Length after it goes unseen: the body
        would then be read as the next request."""
        lines = self.rfile.whole_head()  # usually all there: taken whole
        line_by_line = lines is None  # else the request line is judged before the rest is read
        if line_by_line:
            lines = [self._read_line(MAX_REQUEST_LINE_BYTES, 414, "request line is longer "
                                     "than %d bytes" % MAX_REQUEST_LINE_BYTES)]
        if not lines[0]:  # RFC 9112 §2.2: an empty line before the request line is ignored
            lines = lines[1:] or [self._read_line(MAX_REQUEST_LINE_BYTES, 414, "request line "
                                                  "is longer than %d bytes"
                                                  % MAX_REQUEST_LINE_BYTES)]
        self.requestline = lines[0] = (lines[0].decode("iso-8859-1")
                                       if isinstance(lines[0], bytes) else lines[0])
        if len(self.requestline) > MAX_REQUEST_LINE_BYTES:
            raise self._framing_error(414, "request line is longer than %d bytes"
                                      % MAX_REQUEST_LINE_BYTES)
        parts = self.requestline.split(" ")
        if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1]:
            raise self._framing_error(400, "malformed request line")
        version = _HTTP_VERSION.fullmatch(parts[2])
        if not version:
            raise self._framing_error(400, "malformed HTTP version")
        self.command, self.path, self.request_version = parts
        if version.group(1) != "1":
            raise self._framing_error(505, "only HTTP/1.0 and HTTP/1.1 are served")
        self.close_connection = version.group(2) == "0"
        if line_by_line:
            while lines[-1] or len(lines) == 1:
                if len(lines) > MAX_FIELDS + 1:
                    raise self._framing_error(431, "more than %d header fields" % MAX_FIELDS)
                lines.append(self._read_line(MAX_FIELD_LINE_BYTES, 431, "a header field line "
                                             "is over %d bytes" % MAX_FIELD_LINE_BYTES)
                             .decode("iso-8859-1"))
            lines.pop()  # the empty line that ends the head

        if len(lines) > MAX_FIELDS + 1:
            raise self._framing_error(431, "more than %d header fields" % MAX_FIELDS)
        fields = []
        for line in lines[1:]:
            if len(line) > MAX_FIELD_LINE_BYTES:
                raise self._framing_error(431, "a header field line is over %d bytes"
                                          % MAX_FIELD_LINE_BYTES)
            name, colon, value = line.partition(":")
            # RFC 9112 §5.1: no whitespace before the colon (a 400, MUST); §5.2:
            # no obs-fold (a line starting with whitespace fails the same test).
            if not colon or not _TOKEN.fullmatch(name) or _NOT_IN_FIELD_VALUE.search(value):
                raise self._framing_error(400, "malformed header field")
            fields.append((name, value.strip(" \t")))
        self.headers = headers = HeaderFields(fields)

        if not self.close_connection and len(headers.get_all("Host")) != 1:
            raise self._framing_error(400, "exactly one Host header is required (RFC 9112 "
                                           "§3.2)")
        connection = {token.strip().lower() for token in headers.get("Connection", "").split(",")}
        if "close" in connection:
            self.close_connection = True
        elif "keep-alive" in connection:
            self.close_connection = False
        if (headers.get("Expect", "").lower() == "100-continue"
                and self.request_version == "HTTP/1.1"):
            self.handle_expect_100()

    def _read_body(self):
        """Exactly the body that Content-Length frames (RFC 9112 §6.3), up to
        MAX_BODY_BYTES. When the framing is in doubt, the connection closes
        after the answer, so a body can never be read as the next request."""
        if "Transfer-Encoding" in self.headers:
            raise self._framing_error(411, "Transfer-Encoding is not supported; send a "
                                           "Content-Length")
        lengths = set(self.headers.get_all("Content-Length"))
        if not lengths:
            return b""  # RFC 9112 §6.3: neither header means no body
        length = lengths.pop()
        if lengths or not is_decimal(length):
            raise self._framing_error(400, "Content-Length is not a valid length")
        if len(length) > 9 or int(length) > MAX_BODY_BYTES:
            raise self._framing_error(413, "body is over %d bytes" % MAX_BODY_BYTES)
        length = int(length)
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            raise HTTPError(400, "invalid_request", "body is shorter than its Content-Length")
        return body

    def handle_expect_100(self):
        # Only a body that would be read gets "100 Continue"; the others get
        # their 4xx before the client sends them (RFC 9110 §10.1.1).
        length = self.headers.get("Content-Length", "").strip()
        if is_decimal(length) and len(length) <= 9 and int(length) <= MAX_BODY_BYTES:
            return super().handle_expect_100()
        return True

    def send_error(self, code, message=None, explain=None):
        """Should anything in the stdlib still send an error, it is JSON like ours."""
        self.close_connection = self.linger = True  # the rest of the request is unread
        self._send_error(HTTPError(code, ERROR_CODES.get(code, "invalid_request"),
                                   REASONS.get(code, "error")))

    def _send_error(self, error):
        description = _NOT_IN_DESCRIPTIONS.sub("?", error.description)
        body = json_bytes({"error": error.error, "error_description": description})
        self._send(error.status, JSON_TYPE, body, NO_STORE + error.headers)

    def _send(self, status, content_type, body, headers=()):
        """The one place an answer is written: head and body in one send."""
        if self.server.stopping:
            self.close_connection = True
        connection = ("close" if self.close_connection else
                      "keep-alive" if self.request_version == "HTTP/1.0" else None)
        head = (_head_template(status, content_type, headers, connection)
                % (http_date(time.time()), len(body))).encode("latin-1")
        seconds = time.perf_counter() - self.started
        log.info('%s "%s" %d %d %.1fms', self.client_address[0], self._logged_requestline(),
                 status, len(body), seconds * 1000)
        self.server.metrics.answered(self.endpoint, status, seconds)
        self.wfile.write(head if self.command == "HEAD" else head + body)

    def _drain_input(self):
        # Closing a socket with unread input sends a reset, which can destroy
        # the error answer before the client reads it: shut down writing,
        # then read what is left for a short while.
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_SECONDS)
            deadline = time.monotonic() + LINGER_SECONDS
            while time.monotonic() < deadline and self.connection.recv(64 * 1024):
                pass
        except OSError:
            pass

    def _logged_requestline(self):
        return self.requestline.translate(_LOG_ESCAPES) if self.requestline else "-"

    def log_message(self, format, *args):
        log.info("%s " + format, self.client_address[0], *args)


# ---------------------------------------------------------------- the HTTP edge: the server

def _shut(connection):
    try:
        connection.shutdown(socket.SHUT_RDWR)  # its thread's read returns at once
    except OSError:
        pass


_TOO_BUSY = json_bytes({"error": "temporarily_unavailable",
                        "error_description": "too many connections"})
TOO_BUSY_ANSWER = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                   "Content-Length: %d\r\nRetry-After: 1\r\nCache-Control: no-store\r\n"
                   "X-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n"
                   % len(_TOO_BUSY)).encode("ascii") + _TOO_BUSY


class IssuerServer(ThreadingHTTPServer):
    """The listening socket, a thread per connection, the config and the keys.

    The keys live in one immutable KeySet behind self.keys; SIGHUP swaps it
    in one assignment, so a request sees the old keys or the new, never a mix."""

    daemon_threads = True
    block_on_close = False  # drain() waits for requests in flight, with a deadline
    request_queue_size = LISTEN_BACKLOG
    idle_timeout = IDLE_TIMEOUT_SECONDS
    request_timeout = REQUEST_TIMEOUT_SECONDS

    def __init__(self, config, keys=None):
        """Loads the auth and TLS files (ConfigError), then binds (OSError)."""
        self.address_family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self.keys = keys
        self.password_checks = threading.BoundedSemaphore(PASSWORD_CHECKS_AT_ONCE)
        self.auth = (None if config.auth_file is None
                     else Authenticator(load_users(config.auth_file), self.password_checks))
        self.limiter = FailureLimiter()
        self.token_ids = TokenIds()
        self.metrics = Metrics(config.workers)
        self.tls_context = None if config.tls_cert is None else load_tls_context(config)
        self.stopping = False
        self.max_connections = config.max_connections
        self._admitted = 0  # connections accepted and not yet closed; one thread each
        self._connections = set()  # their handlers, once running
        self._connections_changed = threading.Condition()
        self._refused, self._refusals_logged_at = 0, 0.0
        self._reload_lock = threading.Lock()
        super().__init__((config.host, config.port), RequestHandler)
        if config.issuer is None:
            issuer = "%s://localhost:%d" % (config.scheme, self.server_address[1])
            config = replace(config, issuer=issuer)
        self.config = config
        self.discovery_body = json_bytes(discovery_document(config.issuer))

    def server_bind(self):
        # HTTPServer.server_bind also calls socket.getfqdn(): a DNS lookup that
        # can stall start-up for seconds. The name is not used.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self):
        host, port = self.server_address[:2]
        return "%s://%s:%d" % (self.config.scheme, "[%s]" % host if ":" in host else host, port)

    def finish_request(self, request, client_address):
        """On the connection's own thread: the TLS handshake, within the request
        timeout (in the accepting thread, one slow client would stall them all)."""
        context = self.tls_context
        if context is None:
            return super().finish_request(request, client_address)
        request.settimeout(self.request_timeout)
        try:
            connection = context.wrap_socket(request, server_side=True)
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
            log.info("TLS handshake with %s failed: %s", client_address[0],
                     getattr(error, "reason", None) or error)
            return
        try:
            super().finish_request(connection, client_address)
        finally:
            connection.close()

    def authenticate(self, request):
        """For POST /auth/token: who is asking, or None when it is open to all.
        With an auth file, the HTTP Basic user; else, with a client CA, the
        client certificate's common name; with both, both are needed and the
        Basic user is the subject."""
        subject = None
        if self.config.tls_client_ca is not None:
            subject = certificate_subject(request.connection)
            if subject is None:
                raise HTTPError(401, "invalid_client", "a client certificate is required")
        auth = self.auth
        if auth is not None:
            key, now = client_key(request.client_address[0]), time.monotonic()
            wait = self.limiter.retry_after(key, now)
            if wait:
                raise HTTPError(429, "slow_down", "too many failed logins from this address",
                                headers=[("Retry-After", str(wait))])
            credentials = basic_credentials(request.headers.get("Authorization"))
            failure = "no credentials" if credentials is None else auth.check(*credentials, now)
            if failure is not None:
                if credentials is not None:
                    self.limiter.failed(key, now)
                log.info("authentication failed from %s: %s", request.client_address[0], failure)
                raise HTTPError(401, "invalid_client", "missing or wrong credentials",
                                headers=[CHALLENGE])
            subject = credentials[0]
        return subject

    def process_request(self, request, client_address):
        """On the accepting thread: admit the connection, making room by
        closing the longest-idle one if need be, or refuse it with a 503."""
        with self._connections_changed:
            admitted = self._admitted < self.max_connections or self._close_longest_idle()
            if admitted:
                self._admitted += 1
            else:
                self._refused += 1
        if not admitted:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: nothing else will count it out
            self._count_out()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._count_out()

    def _count_out(self):
        with self._connections_changed:
            self._admitted -= 1
            self._connections_changed.notify_all()

    def _close_longest_idle(self):
        # RFC 9112 §9.8: a server may close an idle connection at any time.
        idle = [handler for handler in self._connections if handler.idle]
        if not idle:
            return False
        handler = min(idle, key=lambda h: h.idle_since)
        handler.idle = False
        _shut(handler.connection)
        return True

    def _refuse(self, request):
        # Over TLS the 503 cannot be read before a handshake: just close.
        answer = TOO_BUSY_ANSWER if self.tls_context is None else b""
        self.metrics.refused()
        now = time.monotonic()
        if now - self._refusals_logged_at >= 10:  # a flood of refusals is one line in 10 s
            log.warning("refused %d connections in 10s: %d open, the most --max-connections "
                        "allows", self._refused, self.max_connections)
            self._refused, self._refusals_logged_at = 0, now
        try:
            request.setblocking(False)  # never wait on the accepting thread
            request.send(answer)
        except OSError:
            pass
        self.shutdown_request(request)

    def track(self, handler, live):
        with self._connections_changed:
            if live:
                self._connections.add(handler)
            else:
                self._connections.discard(handler)

    def drain(self, timeout):
        """After serve_forever() returns: close idle keep-alive connections,
        let requests in flight finish, for at most `timeout` seconds."""
        with self._connections_changed:
            self.stopping = True
            for handler in self._connections:
                if handler.idle:
                    _shut(handler.connection)
            return self._connections_changed.wait_for(lambda: not self._admitted, timeout)

    def reload(self):
        """SIGHUP: read the key file, the auth file and the TLS files again.
        Each bad one keeps what it would have replaced, and the log says why."""
        config = self.config
        with self._reload_lock:
            try:
                self.keys = load_keyset(config.key_path)
                self.metrics.reloaded(True)
                log.info("reloaded keys from %s: signing with kid %s, publishing %s",
                         config.key_path, self.keys.kid, ", ".join(self.keys.kids))
            except ConfigError as error:
                self.metrics.reloaded(False)
                log.error("key reload failed, still signing with kid %s: %s", self.keys.kid, error)
            if config.auth_file is not None:
                try:
                    self.auth = Authenticator(load_users(config.auth_file), self.password_checks)
                    log.info("reloaded %d users from %s", len(self.auth.users), config.auth_file)
                except ConfigError as error:
                    log.error("auth file reload failed, keeping %d users: %s",
                              len(self.auth.users), error)
            if config.tls_cert is not None:
                try:
                    self.tls_context = load_tls_context(config)
                    log.info("reloaded the TLS certificate %s", config.tls_cert)
                except ConfigError as error:
                    log.error("TLS reload failed, keeping the certificate in use: %s", error)

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, CLIENT_GONE):
            return  # a client that hangs up or stalls is not an error
        log.exception("error on a connection from %s", client_address[0])


# ---------------------------------------------------------------- commands and main

class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def build_parser():
    parser = _ArgumentParser(
        prog="jwt_issuer.py",
        description="Mint ES256 JWTs at POST /auth/token and publish the public keys at "
                    "GET /auth/jwks, for Vault/OpenBao jwt auth or any JWKS verifier.",
        epilog="Flags win over the environment. Without --auth-file or --tls-client-ca the "
               "token endpoint is open: whoever reaches it can mint a token for any subject, "
               "so it listens on 127.0.0.1 unless told otherwise. SIGHUP reloads the key, auth "
               "and TLS files; SIGTERM and SIGINT stop gracefully.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    parser.add_argument("--host", metavar="HOST",
                        help="address to listen on (env JWT_ISSUER_HOST; default 127.0.0.1)")
    parser.add_argument("--port", metavar="PORT",
                        help="port, 0 for any free one (env JWT_ISSUER_PORT; default 8080)")
    parser.add_argument("--key", metavar="FILE",
                        help="private key: a JWK, a JWK Set (the first private key signs, all "
                             "are published) or an EC P-256 PEM (env JWT_ISSUER_KEY; default "
                             "./key.json, made if missing)")
    parser.add_argument("--issuer", metavar="URL",
                        help='the "iss" claim and discovery issuer, exactly (env '
                             "JWT_ISSUER_ISSUER; default http://localhost:PORT)")
    parser.add_argument("--audience", metavar="AUD", action="append",
                        help='an "aud" value; repeat for several (env JWT_ISSUER_AUDIENCE, '
                             "comma-separated; default none)")
    parser.add_argument("--ttl", metavar="SECONDS",
                        help="token lifetime (env JWT_ISSUER_TTL; default 3600)")
    parser.add_argument("--max-connections", metavar="N",
                        help="connections served at once, one thread each; idle ones are closed "
                             "to make room, then clients get 503 (env JWT_ISSUER_MAX_CONNECTIONS;"
                             " default %d)" % DEFAULT_MAX_CONNECTIONS)
    parser.add_argument("--workers", metavar="N",
                        help="processes serving the one listening socket, forked after the "
                             "bind; the first process supervises them (env JWT_ISSUER_WORKERS; "
                             "default 1)")
    parser.add_argument("--auth-file", metavar="FILE",
                        help="lines user:HASH (see hash-password): POST /auth/token then needs "
                             "HTTP Basic, and the user is the subject (env JWT_ISSUER_AUTH_FILE)")
    parser.add_argument("--tls-cert", metavar="FILE",
                        help="PEM certificate (chain): serve HTTPS (env JWT_ISSUER_TLS_CERT)")
    parser.add_argument("--tls-key", metavar="FILE",
                        help="PEM private key of --tls-cert (env JWT_ISSUER_TLS_KEY)")
    parser.add_argument("--tls-client-ca", metavar="FILE",
                        help="PEM CA: POST /auth/token then needs a client certificate it "
                             "signed, whose common name is the subject unless --auth-file is "
                             "on too (env JWT_ISSUER_TLS_CLIENT_CA)")
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
    try:
        if path is None:
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as pem_file:
                data = pem_file.read(1024 * 1024)
    except OSError as error:
        raise ConfigError("cannot read %s: %s" % (path, error.strerror or error)) from None
    try:
        return private_jwk(parse_pem_private_key(data))
    except ValueError as error:
        raise ConfigError("%s: %s" % (path or "stdin", error)) from None


def _is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def read_password():
    import getpass
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Password again: ") != password:
            raise ConfigError("the two passwords differ")
    else:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        password = password[:-1] if password.endswith("\r") else password
    if not password:
        raise ConfigError("the password is empty")
    return password


def print_password_hash(user):
    if user is not None:
        try:
            check_user_name(user)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    prefix = "" if user is None else user + ":"
    print(prefix + hash_password(read_password(), os.urandom(16)))
    return 0


def startup_warnings(config):
    """What an operator should hear about this configuration at start."""
    warnings = []
    if not _is_loopback(config.host):
        if config.auth_file is None and config.tls_client_ca is None:
            warnings.append("listening on %s: anyone who can reach it can mint a token for any "
                            "subject" % config.host)
        if config.auth_file is not None and config.tls_cert is None:
            warnings.append("listening on %s over plain HTTP with --auth-file: passwords cross "
                            "the network in clear; add --tls-cert and --tls-key" % config.host)
    return warnings


class LogFormatter(logging.Formatter):
    """TIME LEVEL MESSAGE, the time formatted once a second, not per line."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(message)s")
        self._second, self._text = None, ""

    def formatTime(self, record, datefmt=None):
        second = int(record.created)
        if second != self._second:  # two threads may both format it: the same text
            self._second, self._text = second, time.strftime("%Y-%m-%d %H:%M:%S",
                                                             time.localtime(second))
        return "%s,%03d" % (self._text, record.msecs)


class LogHandler(logging.StreamHandler):
    """Lines to stderr, each written at once, but for a line logged with
    extra=WRITTEN_WITH_THE_NEXT_LINE: a token's audit line goes out with its
    access line, in one write() instead of two."""

    def __init__(self):
        # stderr is line-buffered, a write() per line: a buffer of our own on fd 2
        super().__init__(io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                          errors="backslashreplace"))

    def emit(self, record):
        try:
            self.stream.write(self.format(record) + self.terminator)
            if getattr(record, "flush", True):
                self.stream.flush()
        except Exception:
            self.handleError(record)


def configure_logging():
    if not log.handlers:
        # Two lines per token: spare each the work the logging HOWTO lists as
        # optional (its "Optimization" section): caller, thread, process names.
        logging._srcfile = None
        logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
        handler = LogHandler()
        handler.setFormatter(LogFormatter())
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def serve(config):
    configure_logging()
    try:
        server = IssuerServer(config)  # ConfigError for the auth and TLS files
    except OSError as error:
        raise ConfigError("cannot listen on %s port %d: %s"
                          % (config.host, config.port, error.strerror or error)) from None
    try:  # after the bind: a start that fails there makes no key file
        server.keys = keys = obtain_keys(config)
    except ConfigError:
        server.server_close()
        raise

    workers = config.workers
    if workers > 1 and not hasattr(os, "fork"):
        log.warning("--workers %d: this platform has no fork(); serving with one process",
                    workers)
        workers = 1
    log.info("jwt_issuer %s: issuer %s, signing with kid %s, token lifetime %ds%s%s%s%s",
             __version__, server.config.issuer, keys.kid, config.ttl,
             ", audience " + ", ".join(config.audience) if config.audience else "",
             ", %d users" % len(server.auth.users) if server.auth else "",
             ", client certificates from " + config.tls_client_ca if config.tls_client_ca else "",
             ", %d workers" % workers if workers > 1 else "")
    for warning in startup_warnings(config):
        log.warning(warning)
    print("listening on " + server.url, file=sys.stderr, flush=True)
    return run_worker(server) if workers == 1 else supervise(server, workers)


def run_worker(server, supervisor=None):
    """Serve until SIGTERM or SIGINT, then finish what is in flight. A worker
    of --workers also stops when its SUPERVISOR (a pid) is gone: it would only
    hold the socket, with no one to stop or restart it."""
    if supervisor is not None:
        threading.Thread(target=_stop_when_orphaned, args=(server, supervisor),
                         name="orphan-watch", daemon=True).start()

    def stop(signum, frame):
        # shutdown() waits for serve_forever() to return, and this handler
        # runs on the thread serving: call it from another thread.
        threading.Thread(target=server.shutdown, name="shutdown").start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda signum, frame: threading.Thread(
            target=server.reload, name="reload").start())
    server.serve_forever()
    if not server.drain(DRAIN_TIMEOUT_SECONDS):
        log.warning("stopping with requests still in flight after %ds", DRAIN_TIMEOUT_SECONDS)
    server.server_close()
    log.info("stopped")
    return 0


def _stop_when_orphaned(server, supervisor):
    while not server.stopping:
        time.sleep(1)
        if os.getppid() != supervisor:
            log.error("the supervising process (pid %d) is gone; stopping", supervisor)
            server.shutdown()  # from this thread, not the one serving
            return


SUPERVISED_SIGNALS = (signal.SIGTERM, signal.SIGINT) + ((signal.SIGHUP,) if hasattr(
    signal, "SIGHUP") else ())


def supervise(server, count):
    """--workers: fork COUNT workers that serve the socket already bound, start
    another in place of one that dies, pass SIGHUP on to all of them (each
    reloads), and on SIGTERM or SIGINT stop them all and wait for them."""
    workers = {}  # pid -> (slot, when it started)
    stopping = []

    def start(slot):
        # A worker must not run this process's handlers before it has its own.
        signal.pthread_sigmask(signal.SIG_BLOCK, SUPERVISED_SIGNALS)
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                server.metrics.use_row(slot)
                for signum in SUPERVISED_SIGNALS:
                    signal.signal(signum, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, SUPERVISED_SIGNALS)
                status = run_worker(server, supervisor=os.getppid())
            finally:
                logging.shutdown()
                os._exit(status)
        workers[pid] = (slot, time.monotonic())
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SUPERVISED_SIGNALS)

    def pass_on(signum, frame):
        if signum != getattr(signal, "SIGHUP", None):
            stopping.append(signum)
        for pid in list(workers):
            try:
                os.kill(pid, signal.SIGTERM if stopping else signum)
            except ProcessLookupError:
                pass

    for signum in SUPERVISED_SIGNALS:
        signal.signal(signum, pass_on)
    # Every worker wakes for a new connection and one gets it: the others'
    # accept() must say EAGAIN (socketserver then waits again), not block,
    # where a SIGTERM would go unheard until the next connection.
    server.socket.setblocking(False)
    for slot in range(count):
        start(slot)
    log.info("%d workers serving: pids %s", count, ", ".join(str(pid) for pid in workers))
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        slot, started = workers.pop(pid)
        if stopping:
            continue
        code = os.waitstatus_to_exitcode(status)
        how = "was killed by signal %d" % -code if code < 0 else "exited with status %d" % code
        log.error("worker %d (pid %d) %s; starting another", slot, pid, how)
        if time.monotonic() - started < 1:  # dying at once: do not spin
            time.sleep(1)
        start(slot)
    server.server_close()
    log.info("stopped")
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
        return serve(Config.from_args(args, environ))
    except ConfigError as error:
        print("jwt_issuer: error: %s" % error, file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
