/*
 * kms/core/internal.h - helpers shared by the files of kms/core only.
 */
#ifndef P11KMS_KMS_CORE_INTERNAL_H
#define P11KMS_KMS_CORE_INTERNAL_H

#include "kms/core/core.h"

/* The version record `version` of key, or NULL. */
const kms_version_rec *kms_key_find_version(const kms_key_rec *key, uint32_t version);

/* Write the CKA_LABEL of a key version: "p11kms:<name>:v<version>". */
void kms_kek_label(const char *name, uint32_t version, char *out, size_t len);

/* A random (version 4) UUID in canonical lowercase text form. */
p11kms_status kms_uuid_new(char out[KMS_DEK_ID_LEN + 1]);

#endif
