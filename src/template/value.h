/* value.h - the renderer's values: a small tagged union allocated in the render's arena.
 *
 * JSON inputs stay cJSON nodes (V_JSON wraps an object or array; scalars become
 * native values when read), so a conversation is never copied. Strings carry their
 * provenance: P_LIT (template text), P_DATA (from the variables) or P_MIXED with a
 * per-byte mask (1 = from the variables).
 */
#ifndef KVD_TEMPLATE_VALUE_H
#define KVD_TEMPLATE_VALUE_H

#include "tmpl.h"

enum vtype { V_UNDEF, V_NONE, V_BOOL, V_INT, V_FLOAT, V_STR, V_LIST, V_DICT, V_JSON, V_NS, V_MACRO,
             V_METHOD, V_FUNC, V_LOOP };
enum prov { P_LIT, P_DATA, P_MIXED };

typedef struct value value;
typedef struct vlist {
    value *items;
    size_t len, cap;
} vlist;
typedef struct vdict {
    value *keys;
    value *vals;
    size_t len, cap;
} vdict;
typedef struct loopinfo {
    size_t index0, length;
    const vlist *items;
} loopinfo;

struct value {
    uint8_t type;
    uint8_t prov;  /* V_STR: enum prov; V_JSON: P_LIT or P_DATA for the strings inside */
    uint16_t tuple; /* V_LIST made from a tuple literal (prints with parentheses) */
    int id;        /* V_METHOD/V_FUNC: which builtin */
    union {
        bool b;
        int64_t i;
        double f;
        struct {
            const char *s; /* V_UNDEF: the missing name (may be NULL) */
            size_t len;
            const uint8_t *mask; /* P_MIXED only */
        } str;
        vlist *list;
        vdict *dict;      /* V_DICT, V_NS */
        const cJSON *json;
        const tmpl_node *macro;
        value *self;      /* V_METHOD */
        loopinfo *loop;
    } u;
};

#endif
