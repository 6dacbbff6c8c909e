# Declarations for the SMTP command-line kernel, cimported by ext/commands.pyx
# (`from commands cimport ...`).
#
# setup.py names the module tachymail.protocol._commands, so Cython does not take this file as
# the module's own .pxd (it would look for tachymail/protocol/_commands.pxd). Like data.pxd it
# therefore holds only what needs no runtime module: the octets and character classes of the
# grammar, result codes and limits. LineReader and the parser functions are declared in
# commands.pyx.


cdef enum Octet:
    # The octets the grammar names, by value.
    LF = 10
    CR = 13
    SP = 32
    DQUOTE = 34
    PLUS = 43
    COMMA = 44
    HYPHEN = 45
    DOT = 46
    COLON = 58
    SEMICOLON = 59
    LT = 60
    EQUALS = 61
    GT = 62
    AT = 64
    LBRACKET = 91
    BACKSLASH = 92
    RBRACKET = 93


cdef enum Verb:
    # The VERB_* codes the module exports.
    V_UNKNOWN = 0
    V_HELO = 1
    V_EHLO = 2
    V_MAIL = 3
    V_RCPT = 4
    V_DATA = 5
    V_BDAT = 6
    V_RSET = 7
    V_NOOP = 8
    V_QUIT = 9
    V_VRFY = 10
    V_EXPN = 11
    V_HELP = 12
    V_STARTTLS = 13
    V_AUTH = 14


cdef enum LineFlag:
    # The LINE_* flags the module exports.
    F_TOO_LONG = 1
    F_BARE_LF = 2
    F_BARE_CR = 4


cdef enum CharClass:
    # Bits of CLASSES[octet]; RFC 5321 §4.1.2, RFC 5322 §3.2.3, RFC 6531 §3.3, RFC 3461 §4.
    C_ALPHA = 1
    C_DIGIT = 2
    C_HYPHEN = 4
    C_UTF8 = 8          # %x80-FF: part of a UTF-8 sequence, allowed where RFC 6531 says
    C_ATEXT = 16        # atext, plus UTF-8 octets
    C_QTEXT = 32        # qtextSMTP, plus UTF-8 octets
    C_DCONTENT = 64     # dcontent of an address literal
    C_XCHAR = 128       # xtext octet that stands for itself (not "+" or "=")
    C_VALUE = 256       # esmtp-value octet
    C_HEX = 512         # hex digit, either case (IPv6)
    C_HEXUP = 1024      # upper-case hex digit (xtext hexchar)
    C_LETDIG = C_ALPHA | C_DIGIT | C_UTF8          # a U-label octet counts as a letter
    C_LDH = C_ALPHA | C_DIGIT | C_HYPHEN | C_UTF8
    C_KEYWORD = C_ALPHA | C_DIGIT | C_HYPHEN


cdef enum PathResult:
    # What _check_path found in the text between "<" and ">".
    PATH_OK = 0
    PATH_SYNTAX
    PATH_LOCAL_TOO_LONG
    PATH_DOMAIN_TOO_LONG
    PATH_TOO_LONG


cdef enum Param:
    # One bit per known ESMTP keyword.
    P_UNKNOWN = 0
    P_SIZE = 1
    P_BODY = 2
    P_SMTPUTF8 = 4
    P_RET = 8
    P_ENVID = 16
    P_AUTH = 32
    P_REQUIRETLS = 64
    P_NOTIFY = 128
    P_ORCPT = 256
    P_MAIL = P_SIZE | P_BODY | P_SMTPUTF8 | P_RET | P_ENVID | P_AUTH | P_REQUIRETLS
    P_RCPT = P_NOTIFY | P_ORCPT
    P_NO_VALUE = P_SMTPUTF8 | P_REQUIRETLS


cdef enum Limit:
    FIRST_CAPACITY = 1024    # first allocation of a LineReader buffer, in octets
    KEEP_CAPACITY = 65536    # an emptied buffer larger than this is shrunk back
    LOCAL_MAX = 64           # RFC 5321 §4.5.3.1.1
    DOMAIN_MAX = 255         # §4.5.3.1.2
    PATH_MAX = 256           # §4.5.3.1.3, "<" and ">" included
    SIZE_DIGITS_MAX = 20     # RFC 1870
    ENVID_MAX = 100          # RFC 3461 §4.4
    IPV6_TEXT_MAX = 64       # the longest valid IPv6 text is 45 octets
