# The OpenSSL 3 boundary: every libssl / libcrypto declaration busx uses, in
# one place (busx/_tls.pxi uses them). Some are macros in the headers
# (SSL_CTX_set_min_proto_version, SSL_CTX_set_mode, SSL_set_tlsext_host_name);
# Cython calls a macro the same way as a function.

cdef extern from "<openssl/ssl.h>" nogil:
    ctypedef struct SSL_CTX:
        pass
    ctypedef struct SSL:
        pass
    ctypedef struct SSL_METHOD:
        pass
    ctypedef struct X509:
        pass
    ctypedef struct X509_NAME:
        pass
    ctypedef struct stack_st_X509_NAME:
        pass
    ctypedef struct X509_VERIFY_PARAM:
        pass
    enum:
        SSL_ERROR_NONE
        SSL_ERROR_SSL
        SSL_ERROR_WANT_READ
        SSL_ERROR_WANT_WRITE
        SSL_ERROR_SYSCALL
        SSL_ERROR_ZERO_RETURN
        SSL_FILETYPE_PEM
        SSL_VERIFY_NONE
        SSL_VERIFY_PEER
        SSL_VERIFY_FAIL_IF_NO_PEER_CERT
        TLS1_2_VERSION
        SSL_MODE_ENABLE_PARTIAL_WRITE
        SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
        SSL_OP_NO_RENEGOTIATION
        SSL_OP_IGNORE_UNEXPECTED_EOF
        SSL3_RT_MAX_PLAIN_LENGTH
        SSL_SESS_CACHE_OFF
    const SSL_METHOD *TLS_server_method()
    const SSL_METHOD *TLS_client_method()
    SSL_CTX *SSL_CTX_new(const SSL_METHOD *method)
    void SSL_CTX_free(SSL_CTX *ctx)
    int SSL_CTX_up_ref(SSL_CTX *ctx)
    long SSL_CTX_set_min_proto_version(SSL_CTX *ctx, int version)
    long SSL_CTX_set_mode(SSL_CTX *ctx, long mode)
    unsigned long long SSL_CTX_set_options(SSL_CTX *ctx, unsigned long long options)
    int SSL_CTX_use_certificate_chain_file(SSL_CTX *ctx, const char *file)
    int SSL_CTX_use_PrivateKey_file(SSL_CTX *ctx, const char *file, int type)
    int SSL_CTX_check_private_key(const SSL_CTX *ctx)
    int SSL_CTX_load_verify_locations(SSL_CTX *ctx, const char *cafile, const char *capath)
    int SSL_CTX_set_default_verify_paths(SSL_CTX *ctx)
    void SSL_CTX_set_verify(SSL_CTX *ctx, int mode, void *callback)
    stack_st_X509_NAME *SSL_load_client_CA_file(const char *file)
    void SSL_CTX_set_client_CA_list(SSL_CTX *ctx, stack_st_X509_NAME *names)
    SSL *SSL_new(SSL_CTX *ctx)
    void SSL_free(SSL *ssl)
    int SSL_set_fd(SSL *ssl, int fd)
    long SSL_set_mode(SSL *ssl, long mode)
    unsigned long long SSL_set_options(SSL *ssl, unsigned long long options)
    size_t SSL_CTX_set_num_tickets(SSL_CTX *ctx, size_t num_tickets)
    long SSL_CTX_set_session_cache_mode(SSL_CTX *ctx, long mode)
    void SSL_set_accept_state(SSL *ssl)
    void SSL_set_connect_state(SSL *ssl)
    int SSL_do_handshake(SSL *ssl)
    int SSL_is_init_finished(const SSL *ssl)
    int SSL_read_ex(SSL *ssl, void *buf, size_t num, size_t *readbytes)
    int SSL_write_ex(SSL *ssl, const void *buf, size_t num, size_t *written)
    int SSL_get_error(const SSL *ssl, int ret)
    int SSL_pending(const SSL *ssl)
    int SSL_has_pending(const SSL *ssl)
    void SSL_set_read_ahead(SSL *ssl, int yes)
    void SSL_set_default_read_buffer_len(SSL *ssl, size_t length)
    int SSL_shutdown(SSL *ssl)
    int SSL_set1_host(SSL *ssl, const char *hostname)
    long SSL_set_tlsext_host_name(SSL *ssl, const char *name)
    long SSL_get_verify_result(const SSL *ssl)
    X509 *SSL_get1_peer_certificate(const SSL *ssl)
    X509_VERIFY_PARAM *SSL_get0_param(SSL *ssl)


cdef extern from "<openssl/x509.h>" nogil:
    enum:
        X509_V_OK
        NID_commonName
    X509_NAME *X509_get_subject_name(const X509 *x)
    int X509_NAME_get_text_by_NID(X509_NAME *name, int nid, char *buf, int len)
    void X509_free(X509 *x)
    const char *X509_verify_cert_error_string(long n)
    int X509_VERIFY_PARAM_set1_ip_asc(X509_VERIFY_PARAM *param, const char *ipasc)


cdef extern from "<openssl/err.h>" nogil:
    unsigned long ERR_peek_last_error()
    void ERR_error_string_n(unsigned long e, char *buf, size_t len)
    const char *ERR_reason_error_string(unsigned long e)
    void ERR_clear_error()
