# nocrm_automation — PGXS build
MODULE_big = nocrm_automation
OBJS = \
	src/actions.o \
	src/alerts.o \
	src/assign.o \
	src/calendar.o \
	src/chain.o \
	src/dates.o \
	src/definition.o \
	src/direct_insert.o \
	src/delivery.o \
	src/dispatch.o \
	src/due.o \
	src/enrollment.o \
	src/drain.o \
	src/events.o \
	src/gate.o \
	src/group_pick.o \
	src/explain.o \
	src/fieldcmp.o \
	src/firings.o \
	src/guc.o \
	src/hosts.o \
	src/history.o \
	src/jsonb.o \
	src/lead.o \
	src/preassign.o \
	src/relay.o \
	src/restore.o \
	src/round.o \
	src/restore_order.o \
	src/rules.o \
	src/runlog.o \
	src/wake.o \
	src/worker.o \
	src/secrets.o \
	src/spi_plans.o \
	src/stages.o \
	src/tagset.o \
	src/transition.o \
	src/task_events.o \
	src/tasks.o \
	src/templates.o \
	src/transfers.o \
	src/where.o \
	src/writebuf.o

EXTENSION = nocrm_automation
DATA = nocrm_automation--1.0.sql nocrm_automation--1.0--1.1.sql nocrm_automation--1.1--1.2.sql nocrm_automation--1.2--1.3.sql
PGFILEDESC = "nocrm_automation - CRM automations inside PostgreSQL"

# The version of the control file, for the build (e.g. the webhooks' User-Agent).
NOCRM_VERSION = $(shell sed -n "s/^default_version = '\(.*\)'/\1/p" $(srcdir)/nocrm_automation.control)
PG_CPPFLAGS = -I$(srcdir)/src -DNOCRM_VERSION='"$(NOCRM_VERSION)"'
SHLIB_LINK = -lcurl
# -Wclobbered fires on PG_TRY/PG_FINALLY's own _do_rethrow variable in PostgreSQL 15 headers.
PG_CFLAGS = -Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers -Wno-sign-compare -Wno-clobbered

REGRESS = $(patsubst sql/%.sql,%,$(sort $(wildcard sql/*.sql)))
REGRESS_OPTS = --temp-instance=./tmp_check_regress --temp-config=$(srcdir)/test/regress.conf

# One convention: every expected output in expected/ (pg_regress: sql/,
# isolation: specs/).
ISOLATION = $(patsubst specs/%.spec,%,$(sort $(wildcard specs/*.spec)))
ISOLATION_OPTS = --temp-instance=./tmp_check_iso --temp-config=$(srcdir)/test/regress.conf
ifneq ($(wildcard test/specs/*.spec test/expected/*.out),)
$(error isolation tests live in specs/ and expected/ now: move $(wildcard test/specs/*.spec test/expected/*.out) there)
endif

# TAP tests (PostgreSQL::Test::Cluster): crashes, restarts, delivery against
# the sinks in test/sinks.  They use ./tmp_check, hence the other temp dirs.
TAP_TESTS = 1
PROVE_TESTS = test/t/*.pl

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# PGXS does not track header dependencies.
$(OBJS): src/nocrm.h
