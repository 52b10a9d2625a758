-- nocrm_automation 1.2 -> 1.3
\echo Use "ALTER EXTENSION nocrm_automation UPDATE TO '1.3'" to load this file. \quit
