/* tmpl.h - the template engine's private parts: arenas, the syntax tree, the lexer and
 * parser (parse.c), values and the renderer (render.c), builtins (builtins.c). */
#ifndef KVD_TEMPLATE_TMPL_H
#define KVD_TEMPLATE_TMPL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kvd/kvd_template.h"

/* ---- arena: bump allocation, freed all at once; a byte budget bounds renders ---- */
typedef struct tmpl_arena_chunk tmpl_arena_chunk;
typedef struct tmpl_arena {
    tmpl_arena_chunk *head;
    size_t used_total;
    size_t budget;   /* 0: unlimited */
    bool over;       /* the budget was exceeded (vs. malloc failing) */
} tmpl_arena;

void tmpl_arena_init(tmpl_arena *a, size_t budget);
void tmpl_arena_free(tmpl_arena *a);
void *tmpl_alloc(tmpl_arena *a, size_t size); /* 16-byte aligned, zeroed; NULL on failure */
void *tmpl_alloc_raw(tmpl_arena *a, size_t size); /* the same, not zeroed */

/* ---- syntax tree ---- */
enum expr_kind {
    E_STR, E_INT, E_FLOAT, E_BOOL, E_NONE,
    E_NAME, E_LIST, E_TUPLE, E_DICT,
    E_ATTR,      /* a.name */
    E_ITEM,      /* a[b] */
    E_SLICE,     /* a[b:c:d], NULL parts absent */
    E_CALL,      /* a(args) */
    E_FILTER,    /* a | name(args) */
    E_TEST,      /* a is [not] name(args) */
    E_NOT, E_NEG, E_POS,
    E_BIN,       /* a op b */
    E_AND, E_OR,
    E_COND,      /* a if b else c */
};

enum bin_op {
    OP_ADD, OP_SUB, OP_MUL, OP_DIV, OP_FLOORDIV, OP_MOD, OP_POW, OP_CONCAT,
    OP_EQ, OP_NE, OP_LT, OP_LE, OP_GT, OP_GE, OP_IN, OP_NOTIN,
};

typedef struct tmpl_expr tmpl_expr;
struct tmpl_expr {
    int kind;
    int line;
    int op;           /* E_BIN: enum bin_op; E_TEST: negated; E_FILTER/E_TEST: builtin id */
    const char *str;  /* E_STR value, E_NAME/E_ATTR/E_FILTER/E_TEST name */
    size_t len;
    int64_t i;
    double f;
    tmpl_expr *a, *b, *c, *d;
    tmpl_expr **args;       /* call/filter/test arguments; list/tuple items; dict keys */
    const char **arg_names; /* keyword names (NULL for positional); dict: values in vals */
    tmpl_expr **vals;       /* dict values */
    int nargs;
};

enum node_kind { N_TEXT, N_OUTPUT, N_IF, N_FOR, N_SET, N_SET_BLOCK, N_MACRO, N_BREAK, N_CONTINUE };

typedef struct tmpl_node tmpl_node;
struct tmpl_node {
    int kind;
    int line;
    tmpl_node *next;
    const char *text;     /* N_TEXT */
    size_t len;
    tmpl_expr *expr;      /* output value, if/for condition, for iterable, set value */
    tmpl_expr *filter;    /* for ... if filter */
    tmpl_node *body, *else_body;
    const char *names[2]; /* for targets (1 or 2), set target, macro name */
    int num_names;
    const char *attr;     /* set ns.attr */
    const char **params;  /* macro */
    tmpl_expr **defaults;
    int num_params;
};

struct kvd_template {
    tmpl_arena arena;
    tmpl_node *root;
};

/* ---- builtin tables (builtins.c): ids resolved at parse time ---- */
int tmpl_filter_id(const char *name);  /* -1 when unknown */
int tmpl_test_id(const char *name);

#endif
