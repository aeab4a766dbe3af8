/*
 * kms/core/names.c - syntax of key names and DEK ids.
 *
 * Key names: [a-z0-9][a-z0-9._-]{0,63} (they appear in URLs, CKA_LABELs
 * and the AAD, so no character needs escaping anywhere).  DEK ids: the
 * canonical lowercase text form of a UUID.
 */
#include "kms/core/core.h"

int kms_key_name_valid(const char *name)
{
    size_t i;

    if (name == NULL)
        return 0;
    for (i = 0; name[i] != '\0'; i++) {
        char c = name[i];
        int alnum = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
        if (i >= KMS_NAME_MAX)
            return 0;
        if (i == 0 ? !alnum : !(alnum || c == '.' || c == '_' || c == '-'))
            return 0;
    }
    return i > 0;
}

int kms_dek_id_valid(const char *id)
{
    size_t i;

    if (id == NULL)
        return 0;
    for (i = 0; id[i] != '\0'; i++) {
        char c = id[i];
        if (i >= KMS_DEK_ID_LEN)
            return 0;
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (c != '-')
                return 0;
        } else if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) {
            return 0;
        }
    }
    return i == KMS_DEK_ID_LEN;
}
