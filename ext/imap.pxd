# Declarations for the IMAP command tokenizer kernel, cimported by ext/imap.pyx
# (`from imap cimport ...`).
#
# setup.py names the module tachymail.protocol._imap, so Cython does not take this file as the
# module's own .pxd. Like commands.pxd it holds only what needs no runtime module: the octets
# of the grammar, the character classes, the reader's modes and limits.


cdef enum Octet:
    NUL = 0
    LF = 10
    CR = 13
    SP = 32
    DQUOTE = 34
    LPAREN = 40
    RPAREN = 41
    PLUS = 43
    DOT = 46
    ZERO = 48
    NINE = 57
    LT = 60
    GT = 62
    LBRACKET = 91
    BACKSLASH = 92
    RBRACKET = 93
    LBRACE = 123
    RBRACE = 125
    TILDE = 126


cdef enum CharClass:
    # Bits of CLASSES[octet]; RFC 9051 §9.
    C_ATOM = 1       # ATOM-CHAR
    C_TAG = 2        # ASTRING-CHAR except "+"
    C_TOKEN = 4      # octets an atom token may hold here: 7-bit graphic but (){"
    C_DIGIT = 8


cdef enum Mode:
    M_LINE = 0          # reading the command's text up to the next line end
    M_LITERAL = 1       # waiting for a literal's octets
    M_SKIP_LITERAL = 2  # dropping a literal's octets
    M_SKIP_LINE = 3     # dropping octets up to the next LF


cdef enum Limit:
    NUMBER64_DIGITS = 19   # number64 is at most 2^63 - 1
    NUMBER_DIGITS = 10     # number / nz-number: 32-bit
    QUOTE_MAX = 1024       # quote(): longer strings go as literals
