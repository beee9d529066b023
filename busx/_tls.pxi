# The TLS room: OpenSSL on a TCP connection's non-blocking socket (SPEC.md,
# TLS on TCP; docs/security.md says why OpenSSL from C). A TlsContext holds
# certificates and the rules for checking the peer's, shared by every
# connection made with it. tls_recv and tls_send behave like recv() and
# send() on a non-blocking socket, so the broker's loop and the client's I/O
# thread treat a TLS socket like any other. The UNIX path never comes here.
#
# Threads: an SSL object is used by one thread at a time. The broker's belong
# to its loop thread. A client's may be used by three (the I/O thread, a
# publisher sending directly, a thread reading directly), so ClientIO makes
# every call under its tls_lock, a leaf: nothing else is taken while it is
# held. OpenSSL's error queue is per thread, so each call clears it first.

import ipaddress


cdef ssize_t tls_recv(SSL *ssl, char *buf, size_t capacity, int *want) noexcept nogil:
    """recv() through TLS: decrypted bytes read, 0 when the peer closed, or
    -1 with errno: EAGAIN while OpenSSL waits for the socket (*want says for
    which: SSL_ERROR_WANT_READ or SSL_ERROR_WANT_WRITE), EPROTO when TLS
    failed (tls_error_text says why). OpenSSL reads ahead (TLS_READ_AHEAD
    in one read()), and this takes the records it read until it holds none
    or room runs out. Bytes OpenSSL holds are invisible to epoll: a caller
    must call again, with room, while tls_holds_more() says so."""
    cdef size_t got = 0, n = 0
    cdef int rc
    while True:
        tls_clear_errors()
        rc = SSL_read_ex(ssl, buf + got, capacity - got, &n)
        if rc == 1:
            got += n
            if got == capacity or not SSL_has_pending(ssl):
                return got
            continue
        if got:
            return got      # what stopped us comes back on the next call
        return tls_failed(ssl, rc, want)


cdef inline bint tls_holds_more(SSL *ssl) noexcept nogil:
    """Whether OpenSSL holds bytes it read ahead from the socket."""
    return ssl != NULL and SSL_has_pending(ssl)


cdef ssize_t tls_send(SSL *ssl, const char *data, size_t length, int *want) noexcept nogil:
    """send() through TLS: bytes taken (a partial write ends at a record),
    or -1 with errno as for tls_recv. A retry after EAGAIN must offer the
    same bytes again, possibly more and from a moved buffer
    (SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER): both busx write buffers only
    grow at the end until bytes are taken."""
    cdef size_t n = 0
    cdef int rc
    tls_clear_errors()
    rc = SSL_write_ex(ssl, data, length, &n)
    if rc == 1:
        return n
    if tls_failed(ssl, rc, want) == 0:
        busx_set_errno(EPIPE)     # the peer closed: unlike recv, send never returns 0
    return -1


cdef inline void tls_clear_errors() noexcept nogil:
    """Before each SSL call: SSL_get_error reads this thread's OpenSSL error
    queue, and errno for a failing socket, so neither may be left over."""
    ERR_clear_error()
    busx_set_errno(0)


cdef ssize_t tls_failed(SSL *ssl, int rc, int *want) noexcept nogil:
    """Map an SSL call's failure to recv()'s conventions (see tls_recv)."""
    cdef int err = SSL_get_error(ssl, rc)
    if err == SSL_ERROR_WANT_READ or err == SSL_ERROR_WANT_WRITE:
        want[0] = err
        busx_set_errno(EAGAIN)
        return -1
    if err == SSL_ERROR_ZERO_RETURN:
        return 0
    if err == SSL_ERROR_SYSCALL and ERR_peek_last_error() == 0:
        if errno == 0:
            busx_set_errno(ECONNRESET)
        return -1
    busx_set_errno(EPROTO)
    return -1


cdef void tls_error_text(SSL *ssl, char *out, size_t size) noexcept nogil:
    """Why TLS failed, for people: the certificate check's verdict when it
    failed, else OpenSSL's last error on this thread."""
    cdef long verdict = SSL_get_verify_result(ssl) if ssl != NULL else X509_V_OK
    cdef unsigned long err = ERR_peek_last_error()
    if verdict != X509_V_OK:
        snprintf(out, size, b"certificate verify failed: %s",
                 X509_verify_cert_error_string(verdict))
    elif err != 0:
        ERR_error_string_n(err, out, size)
    else:
        snprintf(out, size, b"TLS failed (no reason given by OpenSSL)")


cdef SSL *tls_new(SSL_CTX *ctx, int fd, bint server) noexcept nogil:
    """A connection's SSL object on fd, or NULL when memory runs out."""
    cdef SSL *ssl = SSL_new(ctx)
    if ssl == NULL:
        return NULL
    if SSL_set_fd(ssl, fd) != 1:
        SSL_free(ssl)
        return NULL
    # Set on each connection, not only on our contexts: a Python
    # SSLContext (TlsContext.of_python) carries none of them.
    SSL_set_mode(ssl, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER)
    SSL_set_options(ssl, SSL_OP_NO_RENEGOTIATION | SSL_OP_IGNORE_UNEXPECTED_EOF)
    SSL_set_read_ahead(ssl, 1)
    SSL_set_default_read_buffer_len(ssl, TLS_READ_AHEAD)
    if server:
        SSL_set_accept_state(ssl)
    else:
        SSL_set_connect_state(ssl)
    return ssl


cdef object tls_peer_common_name(SSL *ssl):
    """The subject common name of the certificate the peer presented (and
    OpenSSL verified: contexts that ask for one refuse the handshake
    otherwise), as bytes; None without a certificate."""
    cdef X509 *cert = SSL_get1_peer_certificate(ssl)
    cdef char name[256]
    cdef int length
    if cert == NULL:
        return None
    length = X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName,
                                       name, sizeof(name))
    X509_free(cert)
    return name[:length] if length > 0 else b""


cdef extern from *:
    """
    typedef struct { PyObject_HEAD SSL_CTX *ctx; } PySSLContextLayout;
    """
    # The head of CPython's ssl.SSLContext object (see TlsContext.of_python).
    ctypedef struct PySSLContextLayout:
        SSL_CTX *ctx


cdef str openssl_reason():
    cdef char text[256]
    ERR_error_string_n(ERR_peek_last_error(), text, sizeof(text))
    ERR_clear_error()
    return text.decode("utf-8", "replace")


cdef class TlsContext:
    """Certificates and verification rules (an OpenSSL SSL_CTX): a broker's
    for its TCP listener (for_broker), or a client's (for_client). Every
    connection made with it holds a reference of its own, so a connection
    may outlive this object."""

    def __dealloc__(self):
        if self.ctx != NULL:
            SSL_CTX_free(self.ctx)

    cdef int _start(self, const SSL_METHOD *method) except -1:
        self.ctx = SSL_CTX_new(method)
        if self.ctx == NULL:
            raise MemoryError()
        SSL_CTX_set_min_proto_version(self.ctx, TLS1_2_VERSION)
        # No session resumption: busx connections are long-lived, and
        # tickets would cost every handshake two more messages.
        SSL_CTX_set_num_tickets(self.ctx, 0)
        SSL_CTX_set_session_cache_mode(self.ctx, SSL_SESS_CACHE_OFF)
        # Modes and options (partial writes, no renegotiation, EOF without
        # close_notify as an ordinary end) are set per connection: tls_new.
        return 0

    cdef int _load_identity(self, str cert, str key) except -1:
        if SSL_CTX_use_certificate_chain_file(self.ctx, os.fsencode(cert)) != 1:
            raise ValueError(f"cannot load the certificate {cert!r}: {openssl_reason()}")
        if SSL_CTX_use_PrivateKey_file(self.ctx, os.fsencode(key), SSL_FILETYPE_PEM) != 1:
            raise ValueError(f"cannot load the private key {key!r}: {openssl_reason()}")
        if SSL_CTX_check_private_key(self.ctx) != 1:
            raise ValueError(f"the private key {key!r} does not match the certificate "
                             f"{cert!r}: {openssl_reason()}")
        return 0

    cdef int _trust(self, str ca) except -1:
        """Verify peers against the CA certificates in ca, or the system's."""
        if ca is None:
            if SSL_CTX_set_default_verify_paths(self.ctx) != 1:
                raise ValueError(f"cannot load the system's CA certificates: {openssl_reason()}")
        elif SSL_CTX_load_verify_locations(self.ctx, os.fsencode(ca), NULL) != 1:
            raise ValueError(f"cannot load the CA certificates {ca!r}: {openssl_reason()}")
        return 0

    @staticmethod
    def for_broker(str cert, str key, str client_ca=None):
        """The broker's: its certificate chain and key (PEM files); with
        client_ca, clients must present a certificate that CA signed."""
        cdef TlsContext context = TlsContext()
        context._start(TLS_server_method())
        context._load_identity(cert, key)
        if client_ca is not None:
            context._trust(client_ca)
            SSL_CTX_set_client_CA_list(context.ctx, SSL_load_client_CA_file(
                os.fsencode(client_ca)))
            SSL_CTX_set_verify(context.ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
                               NULL)
        return context

    @staticmethod
    def of_python(context):
        """The SSL_CTX inside a Python ssl.SSLContext, shared (a reference of
        our own), so a client may pass one it already has. Only when
        Python's ssl module and busx run on one and the same OpenSSL: the
        context is then a pointer both understand. CPython keeps it as the
        first field of its SSLContext object (Modules/_ssl.c, PySSLContext);
        a build where _ssl carries its own OpenSSL is refused, not guessed
        at."""
        cdef TlsContext ours = TlsContext()
        cdef void *library
        cdef void *theirs = NULL
        import ssl
        if not isinstance(context, ssl.SSLContext):
            raise TypeError(f"ssl_context must be an ssl.SSLContext, not {type(context).__name__}")
        if context.keylog_filename is not None or getattr(context, "_msg_callback", None):
            # CPython's callbacks expect its own socket objects on the other end.
            raise ValueError("an ssl_context with keylog_filename or a message callback "
                             "cannot be shared (its callbacks expect Python's own sockets)")
        where = getattr(ssl._ssl, "__file__", None)
        library = (dlopen(os.fsencode(where), RTLD_LAZY | RTLD_NOLOAD)
                   if where is not None else NULL)
        if library != NULL:
            theirs = dlsym(library, b"SSL_CTX_new")
            dlclose(library)
        if theirs != <void *>SSL_CTX_new:
            raise ValueError("Python's ssl module does not use the OpenSSL library busx uses, "
                             "so its SSLContext cannot be shared: pass tls_ca, tls_cert and "
                             "tls_key instead")
        ours.ctx = (<PySSLContextLayout *><PyObject *>context).ctx
        SSL_CTX_up_ref(ours.ctx)
        ours.check_hostname = context.check_hostname
        return ours

    @staticmethod
    def for_client(str ca=None, str cert=None, str key=None):
        """A client's: the CAs that may vouch for a broker (None: the
        system's), and its own certificate and key for brokers that ask."""
        cdef TlsContext context = TlsContext()
        context.check_hostname = True
        context._start(TLS_client_method())
        context._trust(ca)
        SSL_CTX_set_verify(context.ctx, SSL_VERIFY_PEER, NULL)
        if cert is not None:
            context._load_identity(cert, key or cert)
        return context


cdef class TlsStream:
    """A client's TLS connection while busx's own handshake runs in Python:
    busx.handshake reads and writes it like a blocking socket with a
    timeout. Then ClientIO.attach takes its SSL object over (take), and the
    I/O thread goes on from where the handshake left the stream."""

    def __cinit__(self):
        self.fd = -1
        self.deadline = -1

    def __init__(self, TlsContext context, int fd, str server_name):
        """fd: a connected, non-blocking TCP socket, owned from now on.
        server_name: the host name (or address) the broker's certificate
        must carry."""
        cdef bint address = _is_address(server_name)
        cdef bytes name
        self.fd = fd        # owned from here: close() frees it, whatever fails below
        try:
            name = server_name.encode("ascii" if address else "idna")
        except UnicodeError:
            raise ValueError(f"{server_name!r} is not a valid host name") from None
        self.ssl = tls_new(context.ctx, fd, False)
        if self.ssl == NULL:
            raise MemoryError()
        if not address and SSL_set_tlsext_host_name(self.ssl, name) != 1:
            raise ValueError(f"cannot ask for {server_name!r}'s certificate (SNI)")
        if not context.check_hostname:
            return
        # The name check must be in force, or any certificate the CAs signed
        # would do: a name OpenSSL cannot take (a scoped IPv6 address) fails.
        if (X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(self.ssl), name) if address
                else SSL_set1_host(self.ssl, name)) != 1:
            raise ValueError(f"cannot check certificates against {server_name!r}")

    def __dealloc__(self):
        self.close()

    def settimeout(self, timeout):
        """Like a socket's: each call that follows ends within `timeout`
        seconds (None: waits as long as it takes), however often OpenSSL
        has to wait for the socket meanwhile."""
        self.deadline = -1 if timeout is None else now_ms() + max(timeout, 0) * 1000

    def setblocking(self, flag):
        """The socket stays non-blocking: this object waits itself."""

    def handshake(self):
        """The TLS handshake; OSError (EPROTO) saying why it failed."""
        cdef int rc
        while True:
            with nogil:
                tls_clear_errors()
                rc = SSL_do_handshake(self.ssl)
            if rc == 1:
                return
            self._wait_or_raise(rc)

    def recv(self, size_t size):
        cdef size_t capacity = max(size, <size_t>SSL3_RT_MAX_PLAIN_LENGTH)
        cdef bytearray into = bytearray(capacity)
        cdef char *at = into
        cdef size_t n = 0
        cdef int rc
        while True:
            with nogil:
                tls_clear_errors()
                rc = SSL_read_ex(self.ssl, at, capacity, &n)
            if rc == 1:
                return bytes(into[:n])
            if SSL_get_error(self.ssl, rc) == SSL_ERROR_ZERO_RETURN:
                return b""
            self._wait_or_raise(rc)

    def sendall(self, bytes data):
        cdef const char *at = data
        cdef size_t size = len(data), done = 0, n = 0
        cdef int rc
        while done < size:
            with nogil:
                tls_clear_errors()
                rc = SSL_write_ex(self.ssl, at + done, size - done, &n)
            if rc == 1:
                done += n
            else:
                self._wait_or_raise(rc)

    cdef int _wait_or_raise(self, int rc) except -1:
        """Wait for the socket as OpenSSL asks, within the timeout; raise
        TimeoutError, or OSError when TLS failed."""
        cdef int want = 0
        cdef pollfd p
        cdef int ready, wait_ms = -1
        cdef char why[256]
        if tls_failed(self.ssl, rc, &want) == 0:
            raise ConnectionResetError(ECONNRESET, "the broker closed the connection")
        if errno != EAGAIN:
            if errno == EPROTO:
                tls_error_text(self.ssl, why, sizeof(why))
                raise OSError(EPROTO, why.decode("utf-8", "replace"))
            raise_os_error("TLS")
        p.fd = self.fd
        p.events = POLLIN if want == SSL_ERROR_WANT_READ else POLLOUT
        if self.deadline >= 0:
            wait_ms = <int>min(max(self.deadline - now_ms(), 0.0), <double>INT_MAX)
        with nogil:
            ready = poll(&p, 1, wait_ms)
        if ready == 0:
            raise TimeoutError("timed out")
        if ready < 0:
            if errno != EINTR:
                raise_os_error("poll")
            PyErr_CheckSignals()        # Ctrl-C ends a handshake (raises); else wait on
        return 0

    cdef SSL *take(self):
        """Hand the SSL object (and the socket it is on) to the caller."""
        cdef SSL *ssl = self.ssl
        self.ssl = NULL
        self.fd = -1
        return ssl

    def detach(self):
        """The socket's fd; this object still owns the TLS state (take)."""
        return self.fd

    def fileno(self):
        return self.fd

    def close(self):
        if self.ssl != NULL:
            SSL_free(self.ssl)
            self.ssl = NULL
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1


def _is_address(str host):
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
