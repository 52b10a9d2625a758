/*
 * delivery.c — sending one email (SMTP) or one JSON POST (HTTP) with
 * libcurl, and building RFC 5322 messages.
 *
 * Nothing here touches the database: the drain calls it with no snapshot
 * held and records the outcome afterwards.  One curl handle per protocol is
 * kept for a batch so connections are reused.
 */
#include "nocrm.h"

#include <curl/curl.h>
#include <netdb.h>
#include <time.h>
#include <unistd.h>

#include "common/base64.h"
#include "common/hmac.h"
#include "common/sha2.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

PG_FUNCTION_INFO_V1(nocrm_email_message);

static bool curl_ready = false;

/* The SMTP server offered SMTPUTF8 in an EHLO of this run (a reused connection sends none). */
static bool smtputf8_offered = false;

typedef struct UploadBuffer
{
	const char *data;
	size_t		len;
	size_t		sent;
	/* a message with UTF-8 addresses goes only to a server offering SMTPUTF8 */
	bool		needs_smtputf8;
	const bool *server_smtputf8;
	bool		refused;
} UploadBuffer;

static size_t
read_upload(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	UploadBuffer *buf = (UploadBuffer *) userdata;
	size_t		room = size * nmemb;
	size_t		left = buf->len - buf->sent;
	size_t		n = left < room ? left : room;

	if (buf->needs_smtputf8 && !(buf->server_smtputf8 && *buf->server_smtputf8))
	{
		buf->refused = true;
		return CURL_READFUNC_ABORT;
	}

	memcpy(ptr, buf->data + buf->sent, n);
	buf->sent += n;
	return n;
}

static size_t
discard_body(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	StringInfo	sink = (StringInfo) userdata;

	/* Keep the start of the answer for error messages. */
	if (sink->len < 200)
		appendBinaryStringInfo(sink, ptr, Min(size * nmemb, (size_t) (200 - sink->len)));
	return size * nmemb;
}

/*
 * Lets a cancel or shutdown stop a slow transfer.  Not InterruptPending:
 * routine timers (statistics flushes) set it too.
 */
static int
check_interrupts(void *clientp, curl_off_t dltotal, curl_off_t dlnow,
				 curl_off_t ultotal, curl_off_t ulnow)
{
	return (QueryCancelPending || ProcDiePending) ? 1 : 0;
}

static void
ensure_curl(void)
{
	if (!curl_ready)
	{
		if (curl_global_init(CURL_GLOBAL_DEFAULT) != 0)
			elog(ERROR, "curl_global_init failed");
		curl_ready = true;
	}
}

void
nocrm_delivery_begin(DeliveryHandles *h)
{
	ensure_curl();
	h->smtp = h->http = NULL;
	h->smtp_config_error = NULL;
	/* until the drain loads this round's secrets (secrets.c) */
	h->smtp_user = nocrm_smtp_user;
	h->smtp_password = nocrm_smtp_password;
	h->webhook_secret = nocrm_webhook_secret;
	smtputf8_offered = false;
}

void
nocrm_delivery_end(DeliveryHandles *h)
{
	if (h->smtp)
		curl_easy_cleanup((CURL *) h->smtp);
	if (h->http)
		curl_easy_cleanup((CURL *) h->http);
	h->smtp = h->http = NULL;
	if (h->smtp_config_error)
		pfree(h->smtp_config_error);
	h->smtp_config_error = NULL;
}

static bool base_options(CURL *c);

static CURL *
handle(void **slot)
{
	CURL	   *c = (CURL *) *slot;

	if (c == NULL)
	{
		c = curl_easy_init();
		if (c == NULL)
			elog(ERROR, "curl_easy_init failed");
		*slot = c;
	}
	else
		curl_easy_reset(c);		/* keeps the connection cache */
	if (!base_options(c))
		elog(ERROR, "libcurl refused a basic option");
	return c;
}

/* A single, plain address: no display name, brackets, spaces or line breaks. */
bool
nocrm_valid_address(const char *addr)
{
	const char *at;

	if (addr == NULL || addr[0] == '\0' || strlen(addr) > 320)
		return false;
	for (const char *p = addr; *p; p++)
		if ((unsigned char) *p <= ' ' || *p == 0x7f || strchr("<>,;\"()[]\\", *p))
			return false;
	at = strchr(addr, '@');
	return at != NULL && at != addr && at[1] != '\0' && strchr(at + 1, '@') == NULL;
}

static bool
is_ascii(const char *s, int len)
{
	for (int i = 0; i < len; i++)
		if ((unsigned char) s[i] > 0x7e)
			return false;
	return true;
}

static bool
is_ascii_printable(const char *s)
{
	for (; *s; s++)
		if ((unsigned char) *s < 0x20 || (unsigned char) *s > 0x7e)
			return false;
	return true;
}

/* RFC 3492 bias adaptation. */
static uint32
puny_adapt(uint64 delta, uint32 points, bool first)
{
	uint32		k = 0;

	delta = first ? delta / 700 : delta / 2;
	delta += delta / points;
	while (delta > ((36 - 1) * 26) / 2)
	{
		delta /= 36 - 1;
		k += 36;
	}
	return k + (36 * delta) / (delta + 38);
}

/*
 * One label as "xn--" + Punycode (RFC 3492).  ASCII letters are lowered;
 * other characters are taken as written (no IDNA2008 mapping).  false for
 * invalid UTF-8.
 */
static bool
punycode_label(const char *label, int len, StringInfo out)
{
	uint32		cp[64];
	int			n = 0;
	uint32		next = 128,
				bias = 72,
				h,
				b = 0;
	uint64		delta = 0;

	for (int i = 0; i < len;)
	{
		int			l = pg_utf_mblen((const unsigned char *) label + i);

		if (i + l > len || !pg_utf8_islegal((const unsigned char *) label + i, l))
			return false;
		if (n >= 64)
			break;				/* too long for a label anyway; the caller says so */
		cp[n] = utf8_to_unicode((const unsigned char *) label + i);
		if (cp[n] >= 'A' && cp[n] <= 'Z')
			cp[n] += 'a' - 'A';
		n++;
		i += l;
	}
	appendStringInfoString(out, "xn--");
	for (int i = 0; i < n; i++)
		if (cp[i] < 128)
		{
			appendStringInfoChar(out, (char) cp[i]);
			b++;
		}
	if (b > 0)
		appendStringInfoChar(out, '-');
	for (h = b; h < (uint32) n;)
	{
		uint32		m = UINT32_MAX;

		for (int i = 0; i < n; i++)
			if (cp[i] >= next && cp[i] < m)
				m = cp[i];
		delta += (uint64) (m - next) * (h + 1);
		next = m;
		for (int i = 0; i < n; i++)
		{
			if (cp[i] < next)
				delta++;
			if (cp[i] == next)
			{
				uint64		q = delta;

				for (uint32 k = 36;; k += 36)
				{
					uint32		t = k <= bias ? 1 : k >= bias + 26 ? 26 : k - bias;
					uint32		d;

					if (q < t)
						break;
					d = t + (q - t) % (36 - t);
					appendStringInfoChar(out, d < 26 ? 'a' + d : '0' + d - 26);
					q = (q - t) / (36 - t);
				}
				appendStringInfoChar(out, q < 26 ? 'a' + q : '0' + q - 26);
				bias = puny_adapt(delta, h + 1, h == b);
				delta = 0;
				h++;
			}
		}
		delta++;
		next++;
	}
	return true;
}

/*
 * The domain in ASCII: non-ASCII labels IDNA-encoded.  NULL, with *problem
 * set, when it cannot be.
 */
static char *
ascii_domain(const char *domain, const char **problem)
{
	StringInfoData out;
	const char *p = domain;

	initStringInfo(&out);
	for (;;)
	{
		const char *dot = strchr(p, '.');
		int			len = dot ? dot - p : strlen(p);
		int			before = out.len;

		if (len == 0)
		{
			*problem = "its domain has an empty label";
			return NULL;
		}
		if (is_ascii(p, len))
			appendBinaryStringInfo(&out, p, len);
		else if (!punycode_label(p, len, &out))
		{
			*problem = "its domain is not valid UTF-8";
			return NULL;
		}
		if (out.len - before > 63)
		{
			*problem = is_ascii(p, len) ? "a label of its domain is longer than 63 characters" :
				"a label of its domain is longer than 63 characters once IDNA-encoded";
			return NULL;
		}
		if (dot == NULL)
			break;
		appendStringInfoChar(&out, '.');
		p = dot + 1;
	}
	if (out.len > 253)
	{
		*problem = "its domain is longer than 253 characters once IDNA-encoded";
		return NULL;
	}
	return out.data;
}

/*
 * Why an address cannot be sent, or NULL.  A non-ASCII local part is fine
 * here: it needs a server that offers SMTPUTF8, known only when sending.
 */
const char *
nocrm_address_problem(const char *addr)
{
	const char *problem = NULL;

	if (!nocrm_valid_address(addr))
		return "it is not one plain address (one @, no spaces, brackets, quotes or line breaks)";
	if (pg_verify_mbstr(PG_UTF8, addr, strlen(addr), true) == false)
		return "it is not valid UTF-8";
	if (ascii_domain(strchr(addr, '@') + 1, &problem) == NULL)
		return problem;
	return NULL;
}

/* The address as sent: the domain IDNA-encoded; *utf8 when the local part needs SMTPUTF8. */
static char *
wire_address(const char *addr, bool *utf8)
{
	const char *at = strchr(addr, '@');
	const char *problem;
	char	   *domain = ascii_domain(at + 1, &problem);

	if (domain == NULL)
		elog(ERROR, "address \"%s\" was not checked", addr);
	if (utf8)
		*utf8 = !is_ascii(addr, at - addr);
	return psprintf("%.*s@%s", (int) (at - addr), addr, domain);
}

static char *
base64(const char *data, int len)
{
	int			enclen = pg_b64_enc_len(len);
	char	   *out = palloc(enclen + 1);
	int			n = pg_b64_encode(data, len, out, enclen);

	if (n < 0)
		elog(ERROR, "base64 encoding failed");
	out[n] = '\0';
	return out;
}

/* Header lines are kept within this (RFC 2047's limit for lines with encoded words). */
#define LINE_MAX_CHARS 76

/*
 * Appends text as RFC 2047 encoded words, folding so that no line passes
 * LINE_MAX_CHARS; col is the length of the current line so far.  Never
 * splits a character.  Returns the length of the last line.
 */
static int
append_words(StringInfo msg, int col, const char *text)
{
	int			len = strlen(text);

	for (int i = 0; i < len;)
	{
		/* " =?UTF-8?B?" + base64 + "?=" */
		int			room = (LINE_MAX_CHARS - col - 13) / 4 * 3;
		int			chunk;

		if (room < 3)
		{
			appendStringInfoString(msg, "\r\n");
			col = 0;
			continue;
		}
		chunk = Min(room, len - i);
		while (chunk < len - i && chunk > 1 &&
			   (((unsigned char) text[i + chunk]) & 0xC0) == 0x80)
			chunk--;
		appendStringInfo(msg, " =?UTF-8?B?%s?=", base64(text + i, chunk));
		col += 13 + pg_b64_enc_len(chunk);
		i += chunk;
		if (i < len)
		{
			appendStringInfoString(msg, "\r\n");
			col = 0;
		}
	}
	return col;
}

static char *
one_line(const char *value)
{
	char	   *clean = pstrdup(value ? value : "");

	for (char *p = clean; *p; p++)
		if (*p == '\r' || *p == '\n' || *p == '\t')
			*p = ' ';
	return clean;
}

/*
 * An unstructured header (Subject): plain when printable ASCII, not too
 * long and nothing in it looks like an encoded word; else encoded words.
 * Line breaks never survive: lead data cannot add headers.
 */
static void
append_text_header(StringInfo msg, const char *name, const char *value)
{
	char	   *clean = one_line(value);
	int			col;

	if (is_ascii_printable(clean) && strlen(clean) < 900 && strstr(clean, "=?") == NULL)
	{
		/* Folded before a space where a line would pass 78 (RFC 5322's SHOULD). */
		appendStringInfo(msg, "%s: ", name);
		col = strlen(name) + 2;
		for (const char *p = clean; *p;)
		{
			const char *e = p;

			/* the next word with the spaces before it */
			while (*e == ' ')
				e++;
			while (*e && *e != ' ')
				e++;
			if (p != clean && e[-1] != ' ' && col + (e - p) > 78)
			{
				appendStringInfoString(msg, "\r\n");
				col = 0;
			}
			appendBinaryStringInfo(msg, p, e - p);
			col += e - p;
			p = e;
		}
		appendStringInfoString(msg, "\r\n");
		return;
	}
	appendStringInfo(msg, "%s:", name);
	append_words(msg, strlen(name) + 1, clean);
	appendStringInfoString(msg, "\r\n");
}

/* A mailbox header (From, Reply-To): the display name (quoted, or encoded words) and the address. */
static void
append_mailbox(StringInfo msg, const char *header, const char *display, const char *addr)
{
	char	   *name = one_line(display);
	int			col;

	if (name[0] == '\0')
	{
		appendStringInfo(msg, "%s: %s\r\n", header, addr);
		return;
	}
	if (is_ascii_printable(name) && strstr(name, "=?") == NULL)
	{
		appendStringInfo(msg, "%s: \"", header);
		for (const char *p = name; *p; p++)
		{
			if (*p == '"' || *p == '\\')
				appendStringInfoChar(msg, '\\');
			appendStringInfoChar(msg, *p);
		}
		appendStringInfo(msg, "\" <%s>\r\n", addr);
		return;
	}
	appendStringInfo(msg, "%s:", header);
	col = append_words(msg, strlen(header) + 1, name);
	if (col + strlen(addr) + 3 > LINE_MAX_CHARS)
		appendStringInfoString(msg, "\r\n");
	appendStringInfo(msg, " <%s>\r\n", addr);
}

/* The address as written in a header: checked ones IDNA-encoded, others on one line. */
static char *
header_address(const char *addr)
{
	return nocrm_address_problem(addr) == NULL ? wire_address(addr, NULL) : one_line(addr);
}

/*
 * RFC 5322 message: headers, then the UTF-8 body in base64 with CRLF line
 * ends (RFC 2045's canonical form of text).  A recipient or sender whose
 * local part is not ASCII is written in UTF-8 (RFC 6532; sent only with
 * SMTPUTF8), a non-ASCII domain IDNA-encoded.  Marked as automatic mail
 * (RFC 3834) so that out-of-office replies do not answer it.
 */
static char *
build_message(const char *from, const char *from_name, const char *reply_to,
			  const char *reply_to_name, const char *id_from, const char *to,
			  const char *subject, const char *body, const char *idempotency_key)
{
	StringInfoData msg;
	StringInfoData text;
	char		date[64];
	time_t		now = time(NULL);
	struct tm	tm;
	bool		id_ok = nocrm_address_problem(id_from) == NULL;
	char	   *from_wire = header_address(from);
	char	   *to_wire = header_address(to);
	const char *domain = id_ok ? strchr(wire_address(id_from, NULL), '@') + 1 : "nocrm.invalid";
	char	   *encoded;
	int			len;

	gmtime_r(&now, &tm);
	/* English names regardless of the server's locale */
	snprintf(date, sizeof(date), "%s, %02d %s %04d %02d:%02d:%02d +0000",
			 ((const char *[]) {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"})[tm.tm_wday],
			 tm.tm_mday,
			 ((const char *[]) {"Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug",
			  "Sep", "Oct", "Nov", "Dec"})[tm.tm_mon],
			 tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);

	initStringInfo(&msg);
	appendStringInfo(&msg, "Date: %s\r\n", date);
	append_mailbox(&msg, "From", from_name, from_wire);
	if (reply_to)
		append_mailbox(&msg, "Reply-To", reply_to_name, header_address(reply_to));
	appendStringInfo(&msg, "To: %s\r\n", to_wire);
	append_text_header(&msg, "Subject", subject);
	appendStringInfo(&msg, "Message-ID: <%s@%s>\r\n", idempotency_key, domain);
	appendStringInfo(&msg, "X-Nocrm-Idempotency-Key: %s\r\n", one_line(idempotency_key));
	appendStringInfoString(&msg, "Auto-Submitted: auto-generated\r\n"
						   "X-Auto-Response-Suppress: All\r\n"
						   "MIME-Version: 1.0\r\n"
						   "Content-Type: text/plain; charset=UTF-8\r\n"
						   "Content-Transfer-Encoding: base64\r\n\r\n");
	initStringInfo(&text);
	for (const char *p = body; *p; p++)
	{
		if (*p == '\r' || *p == '\n')
		{
			appendStringInfoString(&text, "\r\n");
			if (p[0] == '\r' && p[1] == '\n')
				p++;
		}
		else
			appendStringInfoChar(&text, *p);
	}
	encoded = base64(text.data, text.len);
	len = strlen(encoded);
	for (int i = 0; i < len; i += 76)
	{
		appendBinaryStringInfo(&msg, encoded + i, Min(76, len - i));
		appendStringInfoString(&msg, "\r\n");
	}
	return msg.data;
}

char *
nocrm_build_message(const char *from, const char *to, const char *subject,
					const char *body, const char *idempotency_key)
{
	return build_message(from, nocrm_mail_from_name, NULL, NULL, from, to, subject, body,
						 idempotency_key);
}

/* A string member of a queue payload, or NULL. */
static char *
payload_string(Jsonb *payload, const char *key)
{
	JsonbValue *v;

	if (payload == NULL || !JB_ROOT_IS_OBJECT(payload))
		return NULL;
	v = getKeyJsonValueFromContainer(&payload->root, key, strlen(key), NULL);
	if (v == NULL || v->type != jbvString)
		return NULL;
	return pnstrdup(v->val.string.val, v->val.string.len);
}

/*
 * The message of an email queue row: From and Reply-To as the action chose
 * them when it queued the row (payload "from", "from_name", "reply_to",
 * "reply_to_name"), else nocrm.mail_from.  The Message-ID keeps the domain
 * of nocrm.mail_from, and MAIL FROM is always nocrm.mail_from (send_mail).
 */
char *
nocrm_build_queued_message(Jsonb *payload, const char *to, const char *subject,
						   const char *body, const char *idempotency_key)
{
	char	   *from = payload_string(payload, "from");
	char	   *reply_to = payload_string(payload, "reply_to");

	/* checked when queued; an address edited into the row since is not used */
	if (from && nocrm_address_problem(from) != NULL)
		from = NULL;
	if (reply_to && nocrm_address_problem(reply_to) != NULL)
		reply_to = NULL;
	return build_message(from ? from : nocrm_mail_from,
						 from ? payload_string(payload, "from_name") : nocrm_mail_from_name,
						 reply_to, payload_string(payload, "reply_to_name"),
						 nocrm_mail_from, to, subject, body, idempotency_key);
}

/*
 * nocrm.email_message(recipient, subject, body, idempotency_key [, payload]):
 * the message the drain would send now, for previews and tests; with a
 * queue row's payload, with the From and Reply-To it carries.
 */
Datum
nocrm_email_message(PG_FUNCTION_ARGS)
{
	char	   *to = text_to_cstring(PG_GETARG_TEXT_PP(0));
	const char *problem = nocrm_address_problem(to);

	if (problem)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("email address \"%s\" cannot be sent to: %s", to, problem)));
	if (nocrm_address_problem(nocrm_mail_from) != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("nocrm.mail_from is not a valid address: \"%s\"", nocrm_mail_from)));
	PG_RETURN_TEXT_P(cstring_to_text(nocrm_build_queued_message(PG_NARGS() > 4 ? PG_GETARG_JSONB_P(4) : NULL,
																to,
																text_to_cstring(PG_GETARG_TEXT_PP(1)),
																text_to_cstring(PG_GETARG_TEXT_PP(2)),
																text_to_cstring(PG_GETARG_TEXT_PP(3)))));
}

static void
fail(DeliveryResult *r, bool permanent, const char *fmt, const char *detail)
{
	r->ok = false;
	r->permanent = permanent;
	r->error = psprintf(fmt, detail);
}

/* What the server said, for error texts and for telling config errors apart. */
typedef struct SmtpTrace
{
	char		command[16];	/* verb of the last command sent */
	char		failed_command[16]; /* the command the last 4xx/5xx answered */
	char		reply[240];		/* the last 4xx/5xx reply line */
	bool		smtputf8;		/* EHLO offered SMTPUTF8 */
} SmtpTrace;

static int
trace_smtp(CURL *c, curl_infotype type, char *data, size_t size, void *userptr)
{
	SmtpTrace  *t = (SmtpTrace *) userptr;
	size_t		n = 0;

	if (type == CURLINFO_HEADER_OUT)
	{
		while (n < size && n < sizeof(t->command) - 1 && data[n] != ' ' &&
			   data[n] != '\r' && data[n] != '\n')
			n++;
		memcpy(t->command, data, n);
		t->command[n] = '\0';
	}
	else if (type == CURLINFO_HEADER_IN && size >= 3)
	{
		if (size >= 12 && data[0] == '2' && pg_strncasecmp(data + 4, "SMTPUTF8", 8) == 0)
			t->smtputf8 = smtputf8_offered = true;
		if (data[0] == '4' || data[0] == '5')
		{
			while (n < size && n < sizeof(t->reply) - 1 && data[n] != '\r' && data[n] != '\n')
				n++;
			memcpy(t->reply, data, n);
			t->reply[n] = '\0';
			for (char *p = t->reply; *p; p++)
				if ((unsigned char) *p < 0x20 || (unsigned char) *p > 0x7e)
					*p = '?';
			strlcpy(t->failed_command, t->command, sizeof(t->failed_command));
		}
	}
	return 0;
}

/* Whether a 5xx is about us (settings), not about this message. */
static bool
reply_about_us(const SmtpTrace *t, long code)
{
	if (code == 530 || code == 535 || code == 534 || code == 538)
		return true;			/* authentication */
	if (code < 500 || code >= 600)
		return false;
	if (t->failed_command[0] == '\0' || strcmp(t->failed_command, "EHLO") == 0 ||
		strcmp(t->failed_command, "HELO") == 0 || strcmp(t->failed_command, "STARTTLS") == 0 ||
		strcmp(t->failed_command, "AUTH") == 0)
		return true;
	if (strcmp(t->failed_command, "MAIL") == 0 && code != 552)
		return true;
	/* postfix delays these to RCPT (smtpd_delay_reject) */
	return strstr(t->reply, "Helo command rejected") != NULL ||
		strstr(t->reply, "Sender address rejected") != NULL ||
		strstr(t->reply, "Client host rejected") != NULL;
}

/* The default EHLO name: the domain of nocrm.mail_from, else the host's FQDN. */
static char *host_fqdn = NULL;

static char *
default_helo_name(void)
{
	char		host[256];
	struct addrinfo hints,
			   *res = NULL;
	char	   *name = NULL;

	if (nocrm_address_problem(nocrm_mail_from) == NULL)
	{
		char	   *wire = wire_address(nocrm_mail_from, NULL);
		char	   *domain = strchr(wire, '@') + 1;

		if (strchr(domain, '.') != NULL)
			return domain;
	}
	/* the host's name does not change: looked up once per backend */
	if (host_fqdn)
		return pstrdup(host_fqdn);
	if (gethostname(host, sizeof(host)) != 0)
		return NULL;
	host[sizeof(host) - 1] = '\0';
	memset(&hints, 0, sizeof(hints));
	hints.ai_flags = AI_CANONNAME;
	if (strchr(host, '.') == NULL && getaddrinfo(host, NULL, &hints, &res) == 0)
	{
		if (res && res->ai_canonname && strchr(res->ai_canonname, '.'))
			name = pstrdup(res->ai_canonname);
		freeaddrinfo(res);
	}
	host_fqdn = MemoryContextStrdup(TopMemoryContext, name ? name : host);
	return pstrdup(host_fqdn);
}

/*
 * nocrm.smtp_url with the EHLO name as its path (libcurl greets with the
 * path) and, with nocrm.smtp_tls_server_name, that name as its host while
 * *connect_to sends the connection to the host of the setting.  NULL with
 * *problem on a URL libcurl cannot parse.
 */
static char *
smtp_url(char **connect_to, char **helo, const char **problem)
{
	CURLU	   *u = curl_url();
	char	   *path = NULL,
			   *host = NULL,
			   *port = NULL,
			   *url = NULL,
			   *result = NULL;

	*connect_to = NULL;
	*helo = NULL;
	if (u == NULL)
		elog(ERROR, "curl_url failed");
	if (curl_url_set(u, CURLUPART_URL, nocrm_smtp_url, 0) != CURLUE_OK)
	{
		*problem = "nocrm.smtp_url is not a URL libcurl can parse";
		goto done;
	}
	if (nocrm_smtp_helo_name && nocrm_smtp_helo_name[0])
		*helo = pstrdup(nocrm_smtp_helo_name);
	else if (curl_url_get(u, CURLUPART_PATH, &path, 0) == CURLUE_OK && path &&
			 strcmp(path, "/") != 0 && path[0] != '\0')
		*helo = pstrdup(path + 1);	/* given in the URL, as libcurl documents */
	else
		*helo = default_helo_name();
	if (*helo && curl_url_set(u, CURLUPART_PATH, psprintf("/%s", *helo), CURLU_URLENCODE) != CURLUE_OK)
	{
		*problem = "the EHLO name cannot be put into nocrm.smtp_url";
		goto done;
	}
	if (nocrm_smtp_tls_server_name && nocrm_smtp_tls_server_name[0])
	{
		if (curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK ||
			curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) != CURLUE_OK ||
			curl_url_set(u, CURLUPART_HOST, nocrm_smtp_tls_server_name, 0) != CURLUE_OK)
		{
			*problem = "nocrm.smtp_tls_server_name cannot be used with nocrm.smtp_url";
			goto done;
		}
		*connect_to = psprintf("%s:%s:%s:%s", nocrm_smtp_tls_server_name, port, host, port);
	}
	if (curl_url_get(u, CURLUPART_URL, &url, 0) != CURLUE_OK)
	{
		*problem = "nocrm.smtp_url cannot be rebuilt";
		goto done;
	}
	result = pstrdup(url);
done:
	curl_free(path);
	curl_free(host);
	curl_free(port);
	curl_free(url);
	curl_url_cleanup(u);
	return result;
}

/* A configuration error: reported once per run, remembered for the run's other emails. */
static void
config_error(DeliveryHandles *h, DeliveryResult *r, char *text)
{
	r->ok = false;
	r->permanent = false;
	r->config_error = true;
	r->error = text;
	if (h->smtp_config_error == NULL)
	{
		h->smtp_config_error = MemoryContextStrdup(TopMemoryContext, text);
		ereport(WARNING,
				(errcode(ERRCODE_CONFIG_FILE_ERROR),
				 errmsg("nocrm: no email can be sent with the current settings"),
				 errdetail("%s", text),
				 errhint("The other emails of this run were not tried. Fix the setting, then reload the configuration.")));
	}
}

/* A libcurl handle with the options every transfer has: interrupts can cut it. */
static bool
base_options(CURL *c)
{
	return curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L) == CURLE_OK &&
		curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L) == CURLE_OK &&
		curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, check_interrupts) == CURLE_OK;
}

/* An email in flight: what its libcurl handle points to. */
typedef struct MailWork
{
	struct curl_slist *rcpt;
	struct curl_slist *connect_list;
	UploadBuffer buf;
	char		errbuf[CURL_ERROR_SIZE];
	SmtpTrace	trace;
	char	   *url;
	char	   *helo;
	char	   *mail_from;
	bool		utf8;			/* the recipient's local part needs SMTPUTF8 */
	bool		from_utf8;		/* nocrm.mail_from's does */
	int			attempt;		/* 1: again on a new connection */
} MailWork;

#define SMTP_SETOPT(opt, val) \
	do { \
		CURLcode	rc_ = curl_easy_setopt(c, opt, val); \
		if (rc_ != CURLE_OK) \
		{ \
			config_error(h, r, psprintf("SMTP: libcurl refused option %s: %s", #opt, \
										curl_easy_strerror(rc_))); \
			mail_free(t); \
			return false; \
		} \
	} while (0)

static void
mail_free(Transfer *t)
{
	MailWork   *w = (MailWork *) t->work;

	if (w)
	{
		curl_slist_free_all(w->rcpt);
		curl_slist_free_all(w->connect_list);
		pfree(w);
	}
	t->work = NULL;
	t->easy = NULL;				/* the handle is h->smtp, kept for the run */
}

/*
 * Sets up the SMTP handle to send t->message to t->to; the caller performs
 * it (alone, or in the multi handle) and calls nocrm_mail_finish.  false
 * when there is nothing to send: t->result says why.  fresh_connection:
 * the second try, after the kept connection failed.
 */
bool
nocrm_mail_prepare(DeliveryHandles *h, Transfer *t, bool fresh_connection)
{
	DeliveryResult *r = &t->result;
	MailWork   *w = (MailWork *) t->work;
	const char *problem = NULL;
	CURL	   *c;
	bool		header_utf8;

	if (w == NULL)
	{
		char	   *connect_to;

		memset(r, 0, sizeof(*r));
		/* A bad address is final whatever the server settings; check it first. */
		if ((problem = nocrm_address_problem(t->to)) != NULL)
		{
			r->permanent = true;
			r->error = nocrm_valid_address(t->to) ?
				psprintf("invalid recipient address \"%s\": %s", t->to, problem) :
				psprintf("invalid recipient address \"%s\"", t->to);
			return false;
		}
		if (h->smtp_config_error)
		{
			r->config_error = true;
			r->error = pstrdup(h->smtp_config_error);
			return false;
		}
		if (nocrm_smtp_url == NULL || nocrm_smtp_url[0] == '\0')
		{
			config_error(h, r, pstrdup("nocrm.smtp_url is not set"));
			return false;
		}
		if (nocrm_address_problem(nocrm_mail_from) != NULL)
		{
			config_error(h, r, pstrdup("nocrm.mail_from is not a valid address"));
			return false;
		}
		w = palloc0(sizeof(MailWork));
		w->url = smtp_url(&connect_to, &w->helo, &problem);
		if (w->url == NULL)
		{
			pfree(w);
			config_error(h, r, pstrdup(problem));
			return false;
		}
		t->work = w;
		w->rcpt = curl_slist_append(NULL, psprintf("<%s>", wire_address(t->to, &w->utf8)));
		if (connect_to)
			w->connect_list = curl_slist_append(NULL, connect_to);
		w->mail_from = psprintf("<%s>", wire_address(nocrm_mail_from, NULL));
		w->from_utf8 = !is_ascii(nocrm_mail_from, strchr(nocrm_mail_from, '@') - nocrm_mail_from);
		/* names are encoded words: raw UTF-8 in the headers is a From or Reply-To local part */
		header_utf8 = !is_ascii(t->message, strstr(t->message, "\r\n\r\n") ?
								strstr(t->message, "\r\n\r\n") - t->message : strlen(t->message));
		w->buf.data = t->message;
		w->buf.len = strlen(t->message);
		w->buf.needs_smtputf8 = w->utf8 || w->from_utf8 || header_utf8;
		w->buf.server_smtputf8 = &smtputf8_offered;
	}
	w->attempt = fresh_connection ? 1 : 0;
	memset(&w->trace, 0, sizeof(w->trace));
	w->buf.sent = 0;
	w->buf.refused = false;
	w->errbuf[0] = '\0';

	c = handle(&h->smtp);
	t->easy = c;
	SMTP_SETOPT(CURLOPT_PRIVATE, t);
	SMTP_SETOPT(CURLOPT_URL, w->url);
	if (w->connect_list)
		SMTP_SETOPT(CURLOPT_CONNECT_TO, w->connect_list);
	SMTP_SETOPT(CURLOPT_MAIL_FROM, w->mail_from);
	SMTP_SETOPT(CURLOPT_MAIL_RCPT, w->rcpt);
	SMTP_SETOPT(CURLOPT_UPLOAD, 1L);
	SMTP_SETOPT(CURLOPT_READFUNCTION, read_upload);
	SMTP_SETOPT(CURLOPT_READDATA, &w->buf);
	SMTP_SETOPT(CURLOPT_INFILESIZE, (long) w->buf.len);
	SMTP_SETOPT(CURLOPT_ERRORBUFFER, w->errbuf);
	SMTP_SETOPT(CURLOPT_CONNECTTIMEOUT_MS, (long) nocrm_connect_timeout_ms);
	SMTP_SETOPT(CURLOPT_TIMEOUT_MS, (long) nocrm_request_timeout_ms);
	SMTP_SETOPT(CURLOPT_PROTOCOLS_STR, "smtp,smtps");
	SMTP_SETOPT(CURLOPT_VERBOSE, 1L);	/* for the trace: nothing is printed */
	SMTP_SETOPT(CURLOPT_DEBUGFUNCTION, trace_smtp);
	SMTP_SETOPT(CURLOPT_DEBUGDATA, &w->trace);
	SMTP_SETOPT(CURLOPT_USE_SSL,
				nocrm_smtp_tls == SMTP_TLS_REQUIRE ? (long) CURLUSESSL_ALL :
				nocrm_smtp_tls == SMTP_TLS_TRY ? (long) CURLUSESSL_TRY : (long) CURLUSESSL_NONE);
	SMTP_SETOPT(CURLOPT_SSL_VERIFYPEER, nocrm_smtp_tls_verify ? 1L : 0L);
	SMTP_SETOPT(CURLOPT_SSL_VERIFYHOST, nocrm_smtp_tls_verify ? 2L : 0L);
	if (nocrm_smtp_ca_file && nocrm_smtp_ca_file[0])
		SMTP_SETOPT(CURLOPT_CAINFO, nocrm_smtp_ca_file);
	if (nocrm_smtp_ca_path && nocrm_smtp_ca_path[0])
		SMTP_SETOPT(CURLOPT_CAPATH, nocrm_smtp_ca_path);
	if (nocrm_smtp_tls_pinned_key && nocrm_smtp_tls_pinned_key[0])
		SMTP_SETOPT(CURLOPT_PINNEDPUBLICKEY, nocrm_smtp_tls_pinned_key);
	if (h->smtp_user && h->smtp_user[0])
	{
		SMTP_SETOPT(CURLOPT_USERNAME, h->smtp_user);
		SMTP_SETOPT(CURLOPT_PASSWORD, h->smtp_password ? h->smtp_password : "");
	}
	/* The second time, on a new connection. */
	SMTP_SETOPT(CURLOPT_FRESH_CONNECT, fresh_connection ? 1L : 0L);
	return true;
}

/*
 * Judges a finished SMTP transfer into t->result.  true (and no result)
 * when it should go once more at once on a new connection: the connection
 * kept from the previous email was closed by the server or ends with 421
 * (idle timeout, messages per session).
 */
bool
nocrm_mail_finish(DeliveryHandles *h, Transfer *t, int curl_code)
{
	MailWork   *w = (MailWork *) t->work;
	DeliveryResult *r = &t->result;
	CURL	   *c = (CURL *) t->easy;
	CURLcode	res = (CURLcode) curl_code;
	long		code = 0;
	long		connects = 0;
	const char *to = t->to;
	const char *errbuf = w->errbuf;
	SmtpTrace  *trace = &w->trace;

	if (curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code) != CURLE_OK)
		code = 0;
	if (curl_easy_getinfo(c, CURLINFO_NUM_CONNECTS, &connects) != CURLE_OK)
		connects = 1;
	if (res != CURLE_OK && w->attempt == 0 && connects == 0 &&
		(code == 421 || strncmp(trace->reply, "421", 3) == 0 ||
		 res == CURLE_SEND_ERROR || res == CURLE_RECV_ERROR ||
		 res == CURLE_GOT_NOTHING || res == CURLE_WEIRD_SERVER_REPLY))
		return true;

	memset(r, 0, sizeof(*r));
	r->status = code;
	r->timed_out = res == CURLE_OPERATION_TIMEDOUT;
	if (res == CURLE_OK)
		r->ok = true;
	else if (w->buf.refused && !w->utf8 && !w->from_utf8)
	{
		/* the owner's address the action put in From or Reply-To */
		r->permanent = true;
		r->error = pstrdup("SMTP: the From or Reply-To address has a non-ASCII local part, which "
						   "needs SMTPUTF8 (RFC 6531), and the server at nocrm.smtp_url does not "
						   "offer it; the message was not sent");
	}
	else if (w->buf.refused && !w->utf8)
		config_error(h, r, pstrdup("SMTP configuration error: nocrm.mail_from has a non-ASCII local part, "
								   "which needs SMTPUTF8 (RFC 6531), and the server at nocrm.smtp_url "
								   "does not offer it"));
	else if (w->buf.refused)
	{
		/* stopped before the message itself was sent */
		r->permanent = true;
		r->error = psprintf("SMTP: the recipient \"%s\" has a non-ASCII local part, which needs "
							"SMTPUTF8 (RFC 6531), and the server at nocrm.smtp_url does not offer "
							"it; the message was not sent", to);
	}
	else if (res == CURLE_PEER_FAILED_VERIFICATION || res == CURLE_SSL_CACERT_BADFILE)
		config_error(h, r, psprintf("SMTP TLS: the server's certificate was not accepted (%s%s%s); "
									"set nocrm.smtp_ca_file to the CA certificate that signed it "
									"(and nocrm.smtp_tls_server_name to the name in it if nocrm.smtp_url "
									"names the server otherwise), or nocrm.smtp_tls_verify = off to "
									"encrypt without checking the certificate",
									curl_easy_strerror(res), errbuf[0] ? ": " : "", errbuf));
	else if (res == CURLE_SSL_PINNEDPUBKEYNOTMATCH)
		config_error(h, r, psprintf("SMTP TLS: the server's public key does not match "
									"nocrm.smtp_tls_pinned_key (%s%s%s); set it to the key the server "
									"has now, or empty it", curl_easy_strerror(res),
									errbuf[0] ? ": " : "", errbuf));
	else if (res == CURLE_USE_SSL_FAILED)
		config_error(h, r, pstrdup("SMTP TLS: the server does not offer STARTTLS and nocrm.smtp_tls = require"));
	else if (res == CURLE_LOGIN_DENIED || reply_about_us(trace, code) ||
			 res == CURLE_REMOTE_ACCESS_DENIED)
	{
		const char *fix;

		if (strcmp(trace->failed_command, "EHLO") == 0 || strcmp(trace->failed_command, "HELO") == 0 ||
			strstr(trace->reply, "Helo command rejected") || res == CURLE_REMOTE_ACCESS_DENIED)
			fix = psprintf("the server refused the EHLO name \"%s\": set nocrm.smtp_helo_name to this "
						   "host's fully qualified domain name", w->helo ? w->helo : "");
		else if (res == CURLE_LOGIN_DENIED || code == 530 || code == 535 || code == 534 ||
				 code == 538 || strcmp(trace->failed_command, "AUTH") == 0)
			fix = "the server refused the login: check nocrm.smtp_user and nocrm.smtp_password";
		else if (strcmp(trace->failed_command, "MAIL") == 0 || strstr(trace->reply, "Sender address rejected"))
			fix = "the server refused the sender: check nocrm.mail_from";
		else
			fix = "the server refused this client: check nocrm.smtp_url and the server's settings";
		config_error(h, r, psprintf("SMTP configuration error: %s (%s%s%s; server said \"%s\")",
									fix, curl_easy_strerror(res), errbuf[0] ? ": " : "", errbuf,
									trace->reply));
	}
	else
	{
		/* SMTP 5xx about this message is final; 4xx and network trouble are retried. */
		r->permanent = code >= 500 && code < 600;
		if (w->utf8 && !smtputf8_offered && strcmp(trace->failed_command, "RCPT") == 0 && r->permanent)
			r->error = psprintf("SMTP: the recipient \"%s\" has a non-ASCII local part, which needs "
								"SMTPUTF8 (RFC 6531), and the server at nocrm.smtp_url does not offer "
								"it (server said \"%s\")", to, trace->reply);
		else
			r->error = psprintf("SMTP %s%s%s (response %ld)%s%s%s", curl_easy_strerror(res),
								errbuf[0] ? ": " : "", errbuf, code,
								trace->reply[0] ? ": server said \"" : "", trace->reply,
								trace->reply[0] ? "\"" : "");
	}
	mail_free(t);
	return false;
}

/* Sends one email on the run's SMTP connection, waiting for the answer. */
void
nocrm_send_mail(DeliveryHandles *h, const char *to, const char *message, DeliveryResult *r)
{
	Transfer	t;
	bool		fresh = false;

	memset(&t, 0, sizeof(t));
	t.is_mail = true;
	t.to = to;
	t.message = message;
	while (nocrm_mail_prepare(h, &t, fresh))
	{
		CURLcode	res = curl_easy_perform((CURL *) t.easy);

		if (!nocrm_mail_finish(h, &t, res))
			break;
		fresh = true;
	}
	*r = t.result;
	CHECK_FOR_INTERRUPTS();
}

/* A webhook or push in flight. */
typedef struct HttpWork
{
	struct curl_slist *headers;
	StringInfoData answer;
	char		errbuf[CURL_ERROR_SIZE];
} HttpWork;

static void
http_free(Transfer *t)
{
	HttpWork   *w = (HttpWork *) t->work;

	if (t->easy)
		curl_easy_cleanup((CURL *) t->easy);
	if (w)
	{
		curl_slist_free_all(w->headers);
		pfree(w);
	}
	t->easy = NULL;
	t->work = NULL;
}

/*
 * Sets up a handle that POSTs t->body to t->url, with its Idempotency-Key,
 * X-Nocrm-Event and, when t->signature_secret is set, X-Nocrm-Signature:
 * sha256=<hex HMAC of the body>.  false when there is nothing to send:
 * t->result says why.
 */
bool
nocrm_http_prepare(DeliveryHandles *h, Transfer *t)
{
	DeliveryResult *r = &t->result;
	const char *url = t->url;
	HttpWork   *w;
	CURL	   *c;

	memset(r, 0, sizeof(*r));
	if (url == NULL || url[0] == '\0')
	{
		fail(r, false, "%s", "no URL to send to (is nocrm.push_url set?)");
		return false;
	}
	if (strncmp(url, "http://", 7) != 0 && strncmp(url, "https://", 8) != 0)
	{
		fail(r, true, "not an http(s) URL: %s", url);
		return false;
	}
	ensure_curl();
	c = curl_easy_init();
	if (c == NULL)
	{
		fail(r, false, "%s", "HTTP: curl_easy_init failed (out of memory?)");
		return false;
	}
	w = palloc0(sizeof(HttpWork));
	t->easy = c;
	t->work = w;
	initStringInfo(&w->answer);
	w->headers = curl_slist_append(w->headers, "Content-Type: application/json; charset=utf-8");
	w->headers = curl_slist_append(w->headers, psprintf("Idempotency-Key: %s", t->idempotency_key));
	if (t->event)
		w->headers = curl_slist_append(w->headers, psprintf("X-Nocrm-Event: %s", t->event));
	if (t->signature_secret && t->signature_secret[0])
		w->headers = curl_slist_append(w->headers,
									   psprintf("X-Nocrm-Signature: sha256=%s",
												nocrm_hmac_sha256_hex(t->signature_secret, t->body)));
	w->headers = curl_slist_append(w->headers, "Expect:");
#define HTTP_SETOPT(opt, val) \
	do { \
		CURLcode	rc_ = curl_easy_setopt(c, opt, val); \
		if (rc_ != CURLE_OK) \
		{ \
			http_free(t); \
			fail(r, false, "HTTP: libcurl refused option %s", #opt); \
			return false; \
		} \
	} while (0)
	if (!base_options(c))
	{
		http_free(t);
		fail(r, false, "%s", "HTTP: libcurl refused a basic option");
		return false;
	}
	HTTP_SETOPT(CURLOPT_PRIVATE, t);
	HTTP_SETOPT(CURLOPT_URL, url);
	HTTP_SETOPT(CURLOPT_POST, 1L);
	HTTP_SETOPT(CURLOPT_POSTFIELDS, t->body);
	HTTP_SETOPT(CURLOPT_POSTFIELDSIZE, (long) strlen(t->body));
	HTTP_SETOPT(CURLOPT_HTTPHEADER, w->headers);
	HTTP_SETOPT(CURLOPT_USERAGENT, "nocrm_automation/" NOCRM_VERSION);
	HTTP_SETOPT(CURLOPT_WRITEFUNCTION, discard_body);
	HTTP_SETOPT(CURLOPT_WRITEDATA, &w->answer);
	HTTP_SETOPT(CURLOPT_ERRORBUFFER, w->errbuf);
	HTTP_SETOPT(CURLOPT_CONNECTTIMEOUT_MS, (long) nocrm_connect_timeout_ms);
	HTTP_SETOPT(CURLOPT_TIMEOUT_MS, (long) nocrm_request_timeout_ms);
	HTTP_SETOPT(CURLOPT_PROTOCOLS_STR, "http,https");
	if (nocrm_http_ca_file && nocrm_http_ca_file[0])
		HTTP_SETOPT(CURLOPT_CAINFO, nocrm_http_ca_file);
	if (nocrm_http_ca_path && nocrm_http_ca_path[0])
		HTTP_SETOPT(CURLOPT_CAPATH, nocrm_http_ca_path);
#undef HTTP_SETOPT
	return true;
}

/* Judges a finished HTTP transfer into t->result and frees its handle. */
void
nocrm_http_finish(Transfer *t, int curl_code)
{
	HttpWork   *w = (HttpWork *) t->work;
	DeliveryResult *r = &t->result;
	CURLcode	res = (CURLcode) curl_code;
	long		code = 0;
	curl_off_t	wait = 0;
	const char *errbuf = w->errbuf;

	memset(r, 0, sizeof(*r));
	if (curl_easy_getinfo((CURL *) t->easy, CURLINFO_RESPONSE_CODE, &code) != CURLE_OK)
		code = 0;
	r->status = code;
	r->timed_out = res == CURLE_OPERATION_TIMEDOUT;
	if (res == CURLE_PEER_FAILED_VERIFICATION || res == CURLE_SSL_CACERT_BADFILE)
	{
		/* Retrying cannot change who signed the certificate. */
		r->permanent = true;
		r->error = psprintf("HTTP TLS: the server's certificate was not accepted (%s%s%s); set "
							"nocrm.http_ca_file to the CA certificate that signed it, then "
							"nocrm.requeue_dead()",
							curl_easy_strerror(res), errbuf[0] ? ": " : "", errbuf);
	}
	else if (res != CURLE_OK)
		r->error = psprintf("HTTP %s%s%s", curl_easy_strerror(res), errbuf[0] ? ": " : "", errbuf);
	else if (code >= 200 && code < 300)
		r->ok = true;
	else if (code == 410)
	{
		/* the receiver says the URL is gone for good */
		r->permanent = true;
		r->error = psprintf("HTTP 410 Gone: the receiver says %s no longer exists; not retried "
							"(fix the automation's url, then nocrm.requeue_dead())", t->url);
	}
	else
	{
		/* Retry-After (seconds or an HTTP-date; libcurl parses both) of a 429 or 503 */
		if ((code == 429 || code == 503) &&
			curl_easy_getinfo((CURL *) t->easy, CURLINFO_RETRY_AFTER, &wait) == CURLE_OK && wait > 0)
			r->retry_after = (double) wait;
		/* 4xx but 429 is the receiver refusing this request for good. */
		r->permanent = code >= 300 && code < 500 && code != 429;
		if (r->retry_after > 0)
			r->error = psprintf("HTTP %ld (Retry-After: %.0f s): %s", code, r->retry_after,
								w->answer.data);
		else
			r->error = psprintf("HTTP %ld: %s", code, w->answer.data);
	}
	http_free(t);
}

/* POSTs a JSON body and waits for the answer. */
void
nocrm_post_json(DeliveryHandles *h, const char *url, const char *body,
				const char *idempotency_key, const char *event,
				const char *signature_secret, DeliveryResult *r)
{
	Transfer	t;

	memset(&t, 0, sizeof(t));
	t.url = url;
	t.body = body;
	t.idempotency_key = idempotency_key;
	t.event = event;
	t.signature_secret = signature_secret;
	if (nocrm_http_prepare(h, &t))
		nocrm_http_finish(&t, curl_easy_perform((CURL *) t.easy));
	*r = t.result;
	CHECK_FOR_INTERRUPTS();
}

char *
nocrm_hmac_sha256_hex(const char *key, const char *data)
{
	pg_hmac_ctx *ctx = pg_hmac_create(PG_SHA256);
	uint8		digest[PG_SHA256_DIGEST_LENGTH];
	char	   *hex = palloc(PG_SHA256_DIGEST_LENGTH * 2 + 1);

	if (ctx == NULL ||
		pg_hmac_init(ctx, (const uint8 *) key, strlen(key)) < 0 ||
		pg_hmac_update(ctx, (const uint8 *) data, strlen(data)) < 0 ||
		pg_hmac_final(ctx, digest, sizeof(digest)) < 0)
		elog(ERROR, "HMAC-SHA256 failed");
	pg_hmac_free(ctx);
	hex[hex_encode((const char *) digest, sizeof(digest), hex)] = '\0';
	return hex;
}
