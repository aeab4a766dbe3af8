/*
 * kms/server/rotator.h - the automatic rotation of kmsd: a background
 * thread that, every [server] rotation_check_interval seconds, rotates the
 * keys whose rotation_period has passed (kms_keys_rotate_due).
 */
#ifndef P11KMS_KMS_SERVER_ROTATOR_H
#define P11KMS_KMS_SERVER_ROTATOR_H

#include "kms/core/core.h"
#include "p11kms/status.h"

typedef struct kms_rotator kms_rotator;

/* Start the thread; the first check runs after interval_s seconds.  core
 * must outlive the rotator. */
p11kms_status kms_rotator_start(kms_core *core, int interval_s, kms_rotator **out);

/* Wake the thread, let a running check finish, join, free.  NULL is a
 * no-op. */
void kms_rotator_stop(kms_rotator *r);

#endif
