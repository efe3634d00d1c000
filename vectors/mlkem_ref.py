#!/usr/bin/env python3
"""ML-KEM-768 (FIPS 203, August 2024) written out in plain Python, for known-answer vectors only.

This is the *second, independent* ML-KEM implementation the post-quantum vectors are made
with: it imports nothing but ``hashlib`` and follows the algorithms of FIPS 203 by number
(Algorithms 3-18), so that a vector file produced with it, and then checked against OpenSSL's
ML-KEM through ``cryptography`` (which ``agt_mesh`` uses), is evidence from two code bases.
Unlike the ``cryptography`` API it takes the encapsulation randomness ``m`` as an argument,
which is what makes encapsulation vectors reproducible byte for byte.

It is slow (tens of milliseconds per operation), not constant-time, and must never be used
for anything but generating and checking vectors.

Usage as a script: ``python vectors/mlkem_ref.py`` cross-checks it against ``cryptography``
on a few hundred seeded inputs (key generation, encapsulation to OpenSSL keys, decapsulation
of OpenSSL ciphertexts, implicit rejection) and prints ``N passed, M failed``.
"""

from __future__ import annotations

import hashlib
import sys

# -- parameters (FIPS 203 §8, Table 2: ML-KEM-768) --------------------------------------
N = 256
Q = 3329
K = 3
ETA1 = 2
ETA2 = 2
DU = 10
DV = 4
ZETA = 17  # primitive 256th root of unity mod q (FIPS 203 §4.3)

EK_LEN = 384 * K + 32  # 1184
DK_LEN = 768 * K + 96  # 2400
CT_LEN = 32 * (DU * K + DV)  # 1088
SS_LEN = 32


# -- hash functions (FIPS 203 §4.1) -----------------------------------------------------
def _h(s: bytes) -> bytes:
    return hashlib.sha3_256(s).digest()


def _j(s: bytes) -> bytes:
    return hashlib.shake_256(s).digest(32)


def _g(c: bytes) -> tuple[bytes, bytes]:
    out = hashlib.sha3_512(c).digest()
    return out[:32], out[32:]


def _prf(eta: int, s: bytes, b: int) -> bytes:
    return hashlib.shake_256(s + bytes([b])).digest(64 * eta)


# -- bit and byte helpers (Algorithms 3-6) ----------------------------------------------
def _bits_to_bytes(bits: list[int]) -> bytes:
    out = bytearray(len(bits) // 8)
    for i, bit in enumerate(bits):
        out[i // 8] |= bit << (i % 8)
    return bytes(out)


def _bytes_to_bits(data: bytes) -> list[int]:
    return [(byte >> j) & 1 for byte in data for j in range(8)]


def _compress(d: int, x: int) -> int:
    # round((2^d / q) * x) mod 2^d, rounding halves up; q is odd so no exact halves occur
    return ((x << (d + 1)) + Q) // (2 * Q) % (1 << d)


def _decompress(d: int, y: int) -> int:
    # round((q / 2^d) * y)
    return (Q * y + (1 << (d - 1))) >> d


def _byte_encode(d: int, f: list[int]) -> bytes:
    bits = []
    for a in f:
        for _ in range(d):
            bits.append(a & 1)
            a >>= 1
    return _bits_to_bytes(bits)


def _byte_decode(d: int, data: bytes) -> list[int]:
    bits = _bytes_to_bits(data)
    m = Q if d == 12 else 1 << d
    return [sum(bits[i * d + j] << j for j in range(d)) % m for i in range(N)]


# -- sampling (Algorithms 7-8) ----------------------------------------------------------
def _sample_ntt(seed34: bytes) -> list[int]:
    stream = hashlib.shake_128(seed34).digest(3 * 280)  # 280 triples almost always suffice
    a: list[int] = []
    pos = 0
    while len(a) < N:
        if pos + 3 > len(stream):  # extremely rare: ask the XOF for more
            stream = hashlib.shake_128(seed34).digest(len(stream) * 2)
        c0, c1, c2 = stream[pos], stream[pos + 1], stream[pos + 2]
        pos += 3
        d1 = c0 + 256 * (c1 % 16)
        d2 = c1 // 16 + 16 * c2
        if d1 < Q:
            a.append(d1)
        if d2 < Q and len(a) < N:
            a.append(d2)
    return a


def _sample_cbd(eta: int, data: bytes) -> list[int]:
    bits = _bytes_to_bits(data)
    out = []
    for i in range(N):
        x = sum(bits[2 * i * eta + j] for j in range(eta))
        y = sum(bits[2 * i * eta + eta + j] for j in range(eta))
        out.append((x - y) % Q)
    return out


# -- NTT (Algorithms 9-12) --------------------------------------------------------------
def _bitrev7(i: int) -> int:
    return int(f"{i:07b}"[::-1], 2)


_ZETAS = [pow(ZETA, _bitrev7(i), Q) for i in range(128)]
_GAMMAS = [pow(ZETA, 2 * _bitrev7(i) + 1, Q) for i in range(128)]


def _ntt(f: list[int]) -> list[int]:
    f = list(f)
    i = 1
    length = 128
    while length >= 2:
        for start in range(0, N, 2 * length):
            zeta = _ZETAS[i]
            i += 1
            for j in range(start, start + length):
                t = zeta * f[j + length] % Q
                f[j + length] = (f[j] - t) % Q
                f[j] = (f[j] + t) % Q
        length //= 2
    return f


def _ntt_inv(f: list[int]) -> list[int]:
    f = list(f)
    i = 127
    length = 2
    while length <= 128:
        for start in range(0, N, 2 * length):
            zeta = _ZETAS[i]
            i -= 1
            for j in range(start, start + length):
                t = f[j]
                f[j] = (t + f[j + length]) % Q
                f[j + length] = zeta * (f[j + length] - t) % Q
        length *= 2
    return [x * 3303 % Q for x in f]  # 3303 = 128^-1 mod q


def _mul_ntt(f: list[int], g: list[int]) -> list[int]:
    h = [0] * N
    for i in range(128):
        a0, a1, b0, b1 = f[2 * i], f[2 * i + 1], g[2 * i], g[2 * i + 1]
        h[2 * i] = (a0 * b0 + a1 * b1 * _GAMMAS[i]) % Q
        h[2 * i + 1] = (a0 * b1 + a1 * b0) % Q
    return h


def _add(f: list[int], g: list[int]) -> list[int]:
    return [(a + b) % Q for a, b in zip(f, g, strict=True)]


def _sub(f: list[int], g: list[int]) -> list[int]:
    return [(a - b) % Q for a, b in zip(f, g, strict=True)]


def _matrix(rho: bytes) -> list[list[list[int]]]:
    # A_hat[i][j] = SampleNTT(rho || j || i)
    return [[_sample_ntt(rho + bytes([j, i])) for j in range(K)] for i in range(K)]


# -- K-PKE (Algorithms 13-15) -----------------------------------------------------------
def _kpke_keygen(d: bytes) -> tuple[bytes, bytes]:
    rho, sigma = _g(d + bytes([K]))
    a_hat = _matrix(rho)
    n = 0
    s = []
    for _ in range(K):
        s.append(_sample_cbd(ETA1, _prf(ETA1, sigma, n)))
        n += 1
    e = []
    for _ in range(K):
        e.append(_sample_cbd(ETA1, _prf(ETA1, sigma, n)))
        n += 1
    s_hat = [_ntt(p) for p in s]
    e_hat = [_ntt(p) for p in e]
    t_hat = []
    for i in range(K):
        acc = [0] * N
        for j in range(K):
            acc = _add(acc, _mul_ntt(a_hat[i][j], s_hat[j]))
        t_hat.append(_add(acc, e_hat[i]))
    ek = b"".join(_byte_encode(12, p) for p in t_hat) + rho
    dk = b"".join(_byte_encode(12, p) for p in s_hat)
    return ek, dk


def _kpke_encrypt(ek: bytes, m: bytes, r: bytes) -> bytes:
    t_hat = [_byte_decode(12, ek[384 * i : 384 * (i + 1)]) for i in range(K)]
    rho = ek[384 * K :]
    a_hat = _matrix(rho)
    n = 0
    y = []
    for _ in range(K):
        y.append(_sample_cbd(ETA1, _prf(ETA1, r, n)))
        n += 1
    e1 = []
    for _ in range(K):
        e1.append(_sample_cbd(ETA2, _prf(ETA2, r, n)))
        n += 1
    e2 = _sample_cbd(ETA2, _prf(ETA2, r, n))
    y_hat = [_ntt(p) for p in y]
    u = []
    for i in range(K):  # u = NTT^-1(A_hat^T o y_hat) + e1
        acc = [0] * N
        for j in range(K):
            acc = _add(acc, _mul_ntt(a_hat[j][i], y_hat[j]))
        u.append(_add(_ntt_inv(acc), e1[i]))
    mu = [_decompress(1, b) for b in _byte_decode(1, m)]
    acc = [0] * N
    for i in range(K):
        acc = _add(acc, _mul_ntt(t_hat[i], y_hat[i]))
    v = _add(_add(_ntt_inv(acc), e2), mu)
    c1 = b"".join(_byte_encode(DU, [_compress(DU, x) for x in p]) for p in u)
    c2 = _byte_encode(DV, [_compress(DV, x) for x in v])
    return c1 + c2


def _kpke_decrypt(dk: bytes, c: bytes) -> bytes:
    c1, c2 = c[: 32 * DU * K], c[32 * DU * K :]
    u = [[_decompress(DU, x) for x in _byte_decode(DU, c1[32 * DU * i : 32 * DU * (i + 1)])] for i in range(K)]
    v = [_decompress(DV, x) for x in _byte_decode(DV, c2)]
    s_hat = [_byte_decode(12, dk[384 * i : 384 * (i + 1)]) for i in range(K)]
    acc = [0] * N
    for i in range(K):
        acc = _add(acc, _mul_ntt(s_hat[i], _ntt(u[i])))
    w = _sub(v, _ntt_inv(acc))
    return _byte_encode(1, [_compress(1, x) for x in w])


# -- ML-KEM (Algorithms 16-18, and the seed form of key generation) ---------------------
def keygen(seed64: bytes) -> tuple[bytes, bytes]:
    """``(ek, dk)`` from the 64-byte seed ``d || z`` (ML-KEM.KeyGen_internal)."""
    if len(seed64) != 64:
        raise ValueError("the ML-KEM seed is d || z, 64 bytes")
    d, z = seed64[:32], seed64[32:]
    ek, dk_pke = _kpke_keygen(d)
    return ek, dk_pke + ek + _h(ek) + z


def encaps(ek: bytes, m: bytes) -> tuple[bytes, bytes]:
    """``(shared_secret, ciphertext)`` for randomness ``m`` (ML-KEM.Encaps_internal)."""
    if len(ek) != EK_LEN or len(m) != 32:
        raise ValueError("bad encapsulation key or randomness length")
    # FIPS 203 §7.2 input check: the key must re-encode to itself (coefficients < q)
    for i in range(K):
        chunk = ek[384 * i : 384 * (i + 1)]
        if _byte_encode(12, _byte_decode(12, chunk)) != chunk:
            raise ValueError("encapsulation key fails the modulus check")
    shared, r = _g(m + _h(ek))
    return shared, _kpke_encrypt(ek, m, r)


def decaps(dk: bytes, c: bytes) -> bytes:
    """The shared secret for ciphertext ``c`` (ML-KEM.Decaps_internal, implicit rejection)."""
    if len(dk) != DK_LEN or len(c) != CT_LEN:
        raise ValueError("bad decapsulation key or ciphertext length")
    dk_pke = dk[: 384 * K]
    ek = dk[384 * K : 768 * K + 32]
    h = dk[768 * K + 32 : 768 * K + 64]
    z = dk[768 * K + 64 :]
    m2 = _kpke_decrypt(dk_pke, c)
    shared, r2 = _g(m2 + h)
    rejected = _j(z + c)
    return shared if _kpke_encrypt(ek, m2, r2) == c else rejected


def _cross_check(rounds: int = 40) -> int:
    """Compare with OpenSSL's ML-KEM-768 through ``cryptography``; return the exit status."""
    from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey

    passed = failed = 0

    def check(name: str, ok: bool) -> None:
        nonlocal passed, failed
        if ok:
            passed += 1
        else:
            failed += 1
            print(f"FAIL {name}")

    for i in range(rounds):
        seed = hashlib.shake_256(b"mlkem_ref cross-check seed %d" % i).digest(64)
        m = hashlib.sha256(b"mlkem_ref cross-check m %d" % i).digest()
        ek, dk = keygen(seed)
        theirs = MLKEM768PrivateKey.from_seed_bytes(seed)
        check(f"keygen {i}", theirs.public_key().public_bytes_raw() == ek)
        ss, ct = encaps(ek, m)
        check(f"openssl decaps of our ciphertext {i}", theirs.decapsulate(ct) == ss)
        ss2, ct2 = MLKEM768PublicKey.from_public_bytes(ek).encapsulate()
        check(f"our decaps of an openssl ciphertext {i}", decaps(dk, ct2) == ss2)
        bad = bytearray(ct)
        bad[i % CT_LEN] ^= 1 << (i % 8)
        check(f"implicit rejection {i}", decaps(dk, bytes(bad)) == theirs.decapsulate(bytes(bad)) != ss)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_cross_check())
